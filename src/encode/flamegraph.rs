//! A flame graph: an interactive SVG drawn by inferno from the [`folded`]
//! stacks, so its widths are blocked microseconds for off-CPU time and bytes
//! for address-space changes.

use inferno::flamegraph::color::{BasicPalette, Palette};
use inferno::flamegraph::{self, Options};

use super::{folded, EncodeError};
use crate::profile::{Profile, ProfileKind};

/// Draws `profile` as a flame graph SVG titled `title`.
///
/// Off-CPU time wears the blue "io" palette that off-CPU flame graphs
/// conventionally wear, to set them apart from the warm CPU ones, and
/// address-space changes the green "mem" one of memory flame graphs.
/// Colours go by function name, so a function keeps its colour from one
/// capture to the next.
pub fn encode(profile: &Profile, title: &str) -> Result<Vec<u8>, EncodeError> {
    let folded = folded::encode(profile);
    // inferno would draw an error SVG and fail; say why instead.
    if folded.is_empty() {
        return Err(EncodeError::NothingToDraw { kind: profile.kind });
    }
    let mut options = Options::default();
    options.title = title.to_string();
    options.count_name = folded::unit(profile.kind).to_string();
    options.colors = Palette::Basic(match profile.kind {
        ProfileKind::OffCpu => BasicPalette::Io,
        ProfileKind::AddressSpace => BasicPalette::Mem,
    });
    options.hash = true;
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded.lines(), &mut svg)
        .map_err(EncodeError::Flamegraph)?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::profile::{Frame, FrameKind, Line, Sample, SampleLabels};

    fn profile(blocked_ns: u64) -> Profile {
        profile_of(ProfileKind::OffCpu, blocked_ns)
    }

    fn profile_of(kind: ProfileKind, value: u64) -> Profile {
        let frame = |kind, function: &str| Frame {
            kind,
            address: 0x1000,
            mapping: None,
            lines: vec![Line {
                function: function.to_string(),
                file: None,
                line: None,
            }],
        };
        Profile {
            kind,
            start: UNIX_EPOCH,
            duration: Duration::from_secs(1),
            samples: vec![Sample {
                stack: vec![
                    frame(FrameKind::Kernel, "schedule"),
                    frame(FrameKind::User, "wait_for_lock"),
                ],
                value,
                count: 3,
                labels: SampleLabels {
                    thread_name: "worker".to_string(),
                    ..Default::default()
                },
                timeline: Vec::new(),
            }],
            mappings: Vec::new(),
            comments: Vec::new(),
        }
    }

    #[test]
    fn draws_an_svg_with_the_functions_and_title() {
        let svg = String::from_utf8(encode(&profile(250_000_000), "Off-CPU: demo").unwrap())
            .expect("SVG is UTF-8");
        assert!(svg.contains("<svg"), "not an SVG: {svg:.200}");
        assert!(svg.contains("wait_for_lock"));
        assert!(svg.contains("Off-CPU: demo"));
        assert!(svg.contains("250,000 us"), "count name and value missing");
    }

    #[test]
    fn address_space_changes_are_drawn_in_bytes() {
        let profile = profile_of(ProfileKind::AddressSpace, 3_500_000_000);
        let svg = String::from_utf8(encode(&profile, "Address-space changes").unwrap())
            .expect("SVG is UTF-8");
        assert!(svg.contains("wait_for_lock"));
        assert!(
            svg.contains("3,500,000,000 bytes"),
            "count name and value missing"
        );
        assert!(!svg.contains("3,500,000,000 us"), "bytes, not microseconds");
    }

    #[test]
    fn an_empty_profile_is_an_error() {
        assert!(matches!(
            encode(&profile(0), "empty"),
            Err(EncodeError::NothingToDraw {
                kind: ProfileKind::OffCpu
            })
        ));
        let error = encode(&profile_of(ProfileKind::AddressSpace, 0), "empty").unwrap_err();
        assert!(
            error.to_string().contains("no address-space change"),
            "{error}"
        );
    }
}
