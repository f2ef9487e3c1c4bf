//! OTLP profiles (`opentelemetry.proto.profiles.v1development`): the
//! request a profiles backend (Pyroscope, an OpenTelemetry Collector) takes
//! at `ProfilesService/Export` or `POST /v1development/profiles`.
//!
//! A profile has one sample type, its kind's value type, and the kind's
//! period type. For off-CPU time that is `off_cpu/nanoseconds` with no
//! period type, the shape Pyroscope recognises as off-CPU; an address-space
//! profile is `alloc_space/bytes` with period type `address_space/bytes`,
//! which Pyroscope names its series after. Each sample carries its value
//! per slice of the capture window, with the slice's start as timestamp,
//! so a backend can place it in time.
//!
//! Sample attributes are what [`labels`](crate::profile::labels) maps for
//! OTLP: the few a series is made of. The detail unique to a capture (who
//! held the lock, for how long, in which call) is put at the leaf of each
//! stack as frames; the original pprof keeps it all as labels.
//!
//! One request may carry several profiles (the off-CPU and address-space
//! profiles of one capture, see [`combined_request`]). Everything they refer
//! to lives in the request's one [`ProfilesDictionary`], whose tables are
//! deduplicated and start with their zero value, so that index 0 means
//! "none" everywhere. Kernel frames point at one synthetic
//! `[kernel.kallsyms]` mapping, as in the pprof, so a kernel and a user
//! frame at the same numeric address stay apart.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
    ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::pprof::KERNEL_MAPPING;
use crate::profile::labels::{self as schema, Target};
use crate::profile::{self as model, Frame, FrameKind};

/// The semantic-convention attribute keys this encoder writes.
pub mod keys {
    pub const BUILD_ID: &str = "process.executable.build_id.gnu";
    pub const FRAME_TYPE: &str = "profile.frame.type";
}

/// `original_payload_format` of a gzipped pprof.
pub const PPROF_FORMAT: &str = "pprof";

/// What the profile model does not say and a backend needs: whose profile it
/// is, why it was taken, and the original pprof. Everything but the
/// resource belongs to one profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    /// Resource attributes, in order; the first of a key wins.
    pub resource: Vec<Attribute>,
    /// Resource attributes left out before these, for the resource's
    /// `dropped_attributes_count`.
    pub dropped_resource_attributes: u32,
    /// Profile attributes: what the capture was for.
    pub attributes: Vec<Attribute>,
    /// Unique per capture, never all zero (OTLP calls that invalid).
    pub profile_id: [u8; 16],
    /// The gzipped pprof, sent as `original_payload`.
    pub original_pprof: Option<Vec<u8>>,
}

/// A key, a value and, optionally, the unit of a numeric value.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub key: String,
    pub value: Value,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl Attribute {
    pub fn new(key: impl Into<String>, value: Value) -> Self {
        Attribute {
            key: key.into(),
            value,
            unit: None,
        }
    }

    pub fn str(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new(key, Value::Str(value.into()))
    }

    pub fn int(key: impl Into<String>, value: i64) -> Self {
        Self::new(key, Value::Int(value))
    }

    pub fn with_unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = Some(unit.into());
        self
    }
}

impl Value {
    pub(crate) fn to_any(&self) -> AnyValue {
        let value = match self {
            Value::Str(text) => any_value::Value::StringValue(text.clone()),
            Value::Int(number) => any_value::Value::IntValue(*number),
            Value::Double(number) => any_value::Value::DoubleValue(*number),
            Value::Bool(flag) => any_value::Value::BoolValue(*flag),
        };
        AnyValue { value: Some(value) }
    }

    /// A hashable identity; doubles by their bits, which is what "the same
    /// value" means for deduplication.
    fn identity(&self) -> ValueIdentity {
        match self {
            Value::Str(text) => ValueIdentity::Str(text.clone()),
            Value::Int(number) => ValueIdentity::Int(*number),
            Value::Double(number) => ValueIdentity::Double(number.to_bits()),
            Value::Bool(flag) => ValueIdentity::Bool(*flag),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ValueIdentity {
    None,
    Str(String),
    Int(i64),
    Double(u64),
    Bool(bool),
}

/// Builds the export request for one profile.
pub fn request(profile: &model::Profile, envelope: &Envelope) -> ExportProfilesServiceRequest {
    combined_request(&[(profile, envelope)])
}

/// Builds one export request for several profiles, each with its own
/// envelope (a profile id and original pprof of its own), so that what
/// they have in common (mappings, functions, the stacks an off-CPU and an
/// address-space profile share) is sent once in the shared dictionary.
///
/// Profiles whose envelopes carry equal resources share one
/// `ResourceProfiles`, in the order the resources first appear; within it,
/// profiles keep the order given.
pub fn combined_request(profiles: &[(&model::Profile, &Envelope)]) -> ExportProfilesServiceRequest {
    let mut dictionary = Dictionary::default();
    // A resource is its attributes and the count of those left out.
    type ResourceKey<'a> = (&'a [Attribute], u32);
    let mut by_resource: Vec<(ResourceKey, Vec<Profile>)> = Vec::new();
    for &(profile, envelope) in profiles {
        let otlp_profile = encode_profile(profile, envelope, &mut dictionary);
        let resource = (
            envelope.resource.as_slice(),
            envelope.dropped_resource_attributes,
        );
        match by_resource.iter_mut().find(|(seen, _)| *seen == resource) {
            Some((_, group)) => group.push(otlp_profile),
            None => by_resource.push((resource, vec![otlp_profile])),
        }
    }
    let scope = InstrumentationScope {
        name: env!("CARGO_PKG_NAME").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..InstrumentationScope::default()
    };
    let resource_profiles = by_resource
        .into_iter()
        .map(|((resource, dropped), profiles)| ResourceProfiles {
            resource: Some(Resource {
                attributes: first_of_each_key(resource)
                    .map(|attribute| KeyValue {
                        key: attribute.key.clone(),
                        value: Some(attribute.value.to_any()),
                        ..KeyValue::default()
                    })
                    .collect(),
                dropped_attributes_count: dropped,
                ..Resource::default()
            }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(scope.clone()),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportProfilesServiceRequest {
        resource_profiles,
        dictionary: Some(dictionary.finish()),
    }
}

/// One profile, its references interned into `dictionary`.
fn encode_profile(
    profile: &model::Profile,
    envelope: &Envelope,
    dictionary: &mut Dictionary,
) -> Profile {
    let (type_name, unit) = profile.kind.value_type();
    let sample_type = Some(ValueType {
        type_strindex: dictionary.string(type_name),
        unit_strindex: dictionary.string(unit),
    });
    let period_type = profile
        .kind
        .period_type()
        .map(|(type_name, unit)| ValueType {
            type_strindex: dictionary.string(type_name),
            unit_strindex: dictionary.string(unit),
        });
    let mapping_indices = dictionary.mappings(profile);
    let kernel_mapping = kernel_mapping(profile, dictionary);

    // Samples with one identity (stack, attributes, link) are one OTLP
    // sample whose observations are concatenated, as the spec asks.
    let mut samples: Vec<Sample> = Vec::with_capacity(profile.samples.len());
    let mut by_identity: HashMap<(i32, Vec<i32>, i32), usize> = HashMap::new();
    for sample in &profile.samples {
        let mapped = sample.labels.mapped(Target::Otlp);
        let details: Vec<Frame> = mapped.frames.iter().cloned().map(Frame::detail).collect();
        let location_indices = details
            .iter()
            .chain(&sample.stack)
            .map(|frame| {
                let mapping_index = match frame.kind {
                    FrameKind::Kernel => kernel_mapping,
                    FrameKind::Truncated | FrameKind::Detail => 0,
                    FrameKind::User => frame
                        .mapping
                        .and_then(|index| mapping_indices.get(index).copied())
                        .unwrap_or(0),
                };
                dictionary.location(frame, mapping_index)
            })
            .collect();
        let stack_index = dictionary.stack(location_indices);
        let mut attribute_indices = dictionary.sample_attributes(&mapped);
        attribute_indices.sort_unstable();
        let link_index = sample
            .labels
            .span_link()
            .map_or(0, |link| dictionary.link(&link));

        let (values, timestamps) = observations(profile, sample);
        let identity = (stack_index, attribute_indices, link_index);
        match by_identity.get(&identity) {
            Some(&index) => {
                let merged = &mut samples[index];
                merged.values.extend(values);
                merged.timestamps_unix_nano.extend(timestamps);
            }
            None => {
                by_identity.insert(identity.clone(), samples.len());
                let (stack_index, attribute_indices, link_index) = identity;
                samples.push(Sample {
                    stack_index,
                    attribute_indices,
                    link_index,
                    values,
                    timestamps_unix_nano: timestamps,
                });
            }
        }
    }
    for sample in &mut samples {
        sort_observations(sample);
    }

    let attribute_indices = first_of_each_key(&envelope.attributes)
        .map(|attribute| dictionary.attribute(attribute))
        .collect();
    let (original_payload_format, original_payload) = match &envelope.original_pprof {
        Some(pprof) => (PPROF_FORMAT.to_string(), pprof.clone()),
        None => (String::new(), Vec::new()),
    };
    Profile {
        sample_type,
        samples,
        time_unix_nano: unix_nanos(profile.start),
        duration_nano: u64::try_from(profile.duration.as_nanos()).unwrap_or(u64::MAX),
        // Nothing is sampled: every block and call is counted whole, so a
        // period, where there is one, is 1.
        period: i64::from(period_type.is_some()),
        period_type,
        profile_id: envelope.profile_id.to_vec(),
        dropped_attributes_count: 0,
        original_payload_format,
        original_payload,
        attribute_indices,
    }
}

/// A sample's value per slice, with each slice's start; the whole value at
/// the profile's start when the sample has no timeline.
fn observations(profile: &model::Profile, sample: &model::Sample) -> (Vec<i64>, Vec<u64>) {
    if sample.timeline.is_empty() {
        return (
            vec![saturating_i64(sample.value)],
            vec![unix_nanos(profile.start)],
        );
    }
    sample
        .timeline
        .iter()
        .map(|slice| (saturating_i64(slice.value), unix_nanos(slice.start)))
        .unzip()
}

/// Puts a merged sample's observations back in time order.
fn sort_observations(sample: &mut Sample) {
    if sample.timestamps_unix_nano.is_sorted() {
        return;
    }
    let mut pairs: Vec<(u64, i64)> = sample
        .timestamps_unix_nano
        .iter()
        .copied()
        .zip(sample.values.iter().copied())
        .collect();
    pairs.sort_unstable();
    (sample.timestamps_unix_nano, sample.values) = pairs.into_iter().unzip();
}

/// OTLP wants attribute keys unique per referrer.
fn first_of_each_key(attributes: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attributes
        .iter()
        .enumerate()
        .filter(|(index, attribute)| {
            !attributes[..*index]
                .iter()
                .any(|earlier| earlier.key == attribute.key)
        })
        .map(|(_, attribute)| attribute)
}

/// The synthetic mapping kernel frames point at, spanning exactly the
/// kernel addresses seen; 0 when no frame is a kernel one.
fn kernel_mapping(profile: &model::Profile, dictionary: &mut Dictionary) -> i32 {
    let kernel_addresses = profile
        .samples
        .iter()
        .flat_map(|sample| &sample.stack)
        .filter(|frame| frame.kind == FrameKind::Kernel)
        .map(|frame| frame.address);
    let Some((low, high)) = kernel_addresses.fold(None, |range, address| match range {
        None => Some((address, address)),
        Some((low, high)) => Some((u64::min(low, address), u64::max(high, address))),
    }) else {
        return 0;
    };
    let filename_strindex = dictionary.string(KERNEL_MAPPING);
    dictionary.mapping(Mapping {
        memory_start: low,
        memory_limit: high.saturating_add(1),
        file_offset: 0,
        filename_strindex,
        attribute_indices: Vec::new(),
    })
}

/// The tables of a [`ProfilesDictionary`] under construction. Each keeps a
/// reverse index so that equal items are stored once; each starts with its
/// zero value, which the reverse index also knows, so that an item equal to
/// the zero value is index 0 rather than a second copy of it.
struct Dictionary {
    strings: Table<String, String>,
    mappings: Table<Mapping, MappingKey>,
    locations: Table<Location, LocationKey>,
    functions: Table<Function, (i32, i32, i32, i64)>,
    links: Table<Link, (Vec<u8>, Vec<u8>)>,
    attributes: Table<KeyValueAndUnit, (i32, ValueIdentity, i32)>,
    stacks: Table<Stack, Vec<i32>>,
}

type MappingKey = (u64, u64, u64, i32, Vec<i32>);
type LocationKey = (i32, u64, Vec<(i32, i64)>, Vec<i32>);

struct Table<T, K> {
    items: Vec<T>,
    index: HashMap<K, i32>,
}

impl<T: Default, K: std::hash::Hash + Eq> Table<T, K> {
    fn new(zero_key: K) -> Self {
        Table {
            items: vec![T::default()],
            index: HashMap::from([(zero_key, 0)]),
        }
    }

    fn intern(&mut self, key: K, make: impl FnOnce() -> T) -> i32 {
        if let Some(&index) = self.index.get(&key) {
            return index;
        }
        let index = i32::try_from(self.items.len()).expect("a dictionary table outgrew i32");
        self.items.push(make());
        self.index.insert(key, index);
        index
    }
}

impl Default for Dictionary {
    fn default() -> Self {
        Dictionary {
            strings: Table {
                items: vec![String::new()],
                index: HashMap::from([(String::new(), 0)]),
            },
            mappings: Table::new((0, 0, 0, 0, Vec::new())),
            locations: Table::new((0, 0, Vec::new(), Vec::new())),
            functions: Table::new((0, 0, 0, 0)),
            links: Table::new((Vec::new(), Vec::new())),
            attributes: Table::new((0, ValueIdentity::None, 0)),
            stacks: Table::new(Vec::new()),
        }
    }
}

impl Dictionary {
    fn string(&mut self, text: &str) -> i32 {
        if let Some(&index) = self.strings.index.get(text) {
            return index;
        }
        self.strings.intern(text.to_string(), || text.to_string())
    }

    /// The model's mappings, by model index.
    fn mappings(&mut self, profile: &model::Profile) -> Vec<i32> {
        profile
            .mappings
            .iter()
            .map(|file| {
                let filename_strindex = self.string(&file.file);
                let attribute_indices = file
                    .build_id
                    .iter()
                    .map(|build_id| self.attribute(&Attribute::str(keys::BUILD_ID, build_id)))
                    .collect();
                self.mapping(Mapping {
                    memory_start: file.memory_start,
                    memory_limit: file.memory_limit,
                    file_offset: file.file_offset,
                    filename_strindex,
                    attribute_indices,
                })
            })
            .collect()
    }

    fn mapping(&mut self, mapping: Mapping) -> i32 {
        let key = (
            mapping.memory_start,
            mapping.memory_limit,
            mapping.file_offset,
            mapping.filename_strindex,
            mapping.attribute_indices.clone(),
        );
        self.mappings.intern(key, || mapping)
    }

    fn function(&mut self, line: &model::Line) -> i32 {
        let name = self.string(&line.function);
        let filename = line.file.as_deref().map_or(0, |file| self.string(file));
        // Only the demangled name is known; it doubles as the system name.
        self.functions
            .intern((name, name, filename, 0), || Function {
                name_strindex: name,
                system_name_strindex: name,
                filename_strindex: filename,
                start_line: 0,
            })
    }

    fn location(&mut self, frame: &Frame, mapping_index: i32) -> i32 {
        let lines: Vec<Line> = frame
            .lines
            .iter()
            .map(|line| Line {
                function_index: self.function(line),
                line: line.line.map_or(0, i64::from),
                column: 0,
            })
            .collect();
        let frame_type = match frame.kind {
            FrameKind::Kernel => Some("kernel"),
            FrameKind::User => Some("native"),
            FrameKind::Truncated | FrameKind::Detail => None,
        };
        let attribute_indices: Vec<i32> = frame_type
            .iter()
            .map(|kind| self.attribute(&Attribute::str(keys::FRAME_TYPE, *kind)))
            .collect();
        let key = (
            mapping_index,
            frame.address,
            lines
                .iter()
                .map(|line| (line.function_index, line.line))
                .collect(),
            attribute_indices.clone(),
        );
        self.locations.intern(key, || Location {
            mapping_index,
            address: frame.address,
            lines,
            attribute_indices,
        })
    }

    fn stack(&mut self, location_indices: Vec<i32>) -> i32 {
        self.stacks
            .intern(location_indices.clone(), || Stack { location_indices })
    }

    fn link(&mut self, link: &model::SpanLink) -> i32 {
        let key = (link.trace_id.to_vec(), link.span_id.to_vec());
        self.links.intern(key, || Link {
            trace_id: link.trace_id.to_vec(),
            span_id: link.span_id.to_vec(),
        })
    }

    fn attribute(&mut self, attribute: &Attribute) -> i32 {
        let key_strindex = self.string(&attribute.key);
        let unit_strindex = attribute
            .unit
            .as_deref()
            .map_or(0, |unit| self.string(unit));
        let key = (key_strindex, attribute.value.identity(), unit_strindex);
        self.attributes.intern(key, || KeyValueAndUnit {
            key_strindex,
            value: Some(attribute.value.to_any()),
            unit_strindex,
        })
    }

    /// The series labels; the span link has a table of its own.
    fn sample_attributes(&mut self, mapped: &schema::Mapped<'_>) -> Vec<i32> {
        let attributes: Vec<Attribute> = mapped
            .labels
            .iter()
            .map(|(key, value)| match value {
                schema::Value::Str(text) => Attribute::str(key.as_ref(), text.as_ref()),
                schema::Value::Int(number) => Attribute::int(key.as_ref(), *number),
            })
            .collect();
        first_of_each_key(&attributes)
            .map(|attribute| self.attribute(attribute))
            .collect()
    }

    fn finish(self) -> ProfilesDictionary {
        ProfilesDictionary {
            mapping_table: self.mappings.items,
            location_table: self.locations.items,
            function_table: self.functions.items,
            link_table: self.links.items,
            string_table: self.strings.items,
            attribute_table: self.attributes.items,
            stack_table: self.stacks.items,
        }
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Nanoseconds since the epoch; 0 for a time before it, which OTLP's
/// unsigned field cannot hold.
fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use prost::Message;

    use super::*;
    use crate::profile::fixtures::{kernel, line, user};
    use crate::profile::{Sample as ModelSample, SampleLabels, SpanLink, ThreadState, TimeSlice};

    const SHARED_ADDRESS: u64 = 0x5000;
    const KERNEL_ADDRESS: u64 = 0xffff_ffff_8100_1000;

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn labels(thread_id: u32, state: ThreadState) -> SampleLabels {
        SampleLabels {
            process_id: 100,
            thread_id,
            thread_name: "worker".to_string(),
            state,
            extra: Vec::new(),
            foreign: Vec::new(),
        }
    }

    fn slice(start_ms: u64, blocked_ms: u64) -> TimeSlice {
        TimeSlice {
            start: at_ms(start_ms),
            duration: Duration::from_millis(500),
            value: blocked_ms * 1_000_000,
            count: 1,
        }
    }

    const LINK: SpanLink = SpanLink {
        trace_id: [0x4b; 16],
        span_id: [0x07; 8],
    };

    /// Two threads sharing a stack, an inlined frame, a truncated stack, a
    /// kernel and a user frame at one address, a linked sample, and a
    /// sample split in two by its link that shares everything else.
    fn sample_profile() -> model::Profile {
        let sleep_stack = vec![
            kernel(KERNEL_ADDRESS, "schedule"),
            kernel(KERNEL_ADDRESS + 0x1000, "futex_wait"),
            user(
                0x1234,
                0,
                vec![
                    line("std::sync::Mutex::lock", Some("mutex.rs"), Some(40)),
                    line("app::serve", Some("src/main.rs"), Some(12)),
                ],
            ),
            user(0x1300, 0, vec![line("main", Some("src/main.rs"), Some(3))]),
        ];
        let read_stack = vec![
            kernel(SHARED_ADDRESS, "schedule"),
            user(SHARED_ADDRESS, 1, vec![line("read", None, None)]),
            Frame::marker_truncated(),
        ];
        let mut linked = labels(101, ThreadState::Sleeping);
        linked.set_span_link(LINK);
        let mut locked = labels(103, ThreadState::Disk);
        locked
            .extra
            .push((crate::profile::labels::Key::Lock, "mmap_lock".to_string()));
        model::Profile {
            kind: model::ProfileKind::OffCpu,
            start: at_ms(0),
            duration: Duration::from_secs(2),
            samples: vec![
                ModelSample {
                    stack: sleep_stack.clone(),
                    value: 900_000_000,
                    count: 3,
                    labels: linked,
                    timeline: vec![slice(500, 400), slice(1000, 500)],
                },
                ModelSample {
                    stack: sleep_stack.clone(),
                    value: 100_000_000,
                    count: 1,
                    labels: labels(101, ThreadState::Sleeping),
                    timeline: vec![slice(1500, 100)],
                },
                ModelSample {
                    stack: sleep_stack,
                    value: 2_000_000,
                    count: 1,
                    labels: labels(102, ThreadState::Runnable),
                    timeline: Vec::new(),
                },
                ModelSample {
                    stack: read_stack,
                    value: 340_000_000,
                    count: 2,
                    labels: locked,
                    timeline: vec![slice(0, 300), slice(500, 40)],
                },
            ],
            mappings: vec![
                model::Mapping {
                    memory_start: 0x1000,
                    memory_limit: 0x2000,
                    file_offset: 0,
                    file: "/usr/bin/app".to_string(),
                    build_id: Some("abcdef0123456789".to_string()),
                },
                model::Mapping {
                    memory_start: 0x4000,
                    memory_limit: 0x6000,
                    file_offset: 0x1000,
                    file: "/usr/lib/libc.so.6".to_string(),
                    build_id: None,
                },
            ],
            comments: Vec::new(),
        }
    }

    /// A 3.5 GB map rehash, in the same binary as the off-CPU profile's
    /// stacks.
    fn address_space_profile() -> model::Profile {
        let rehash_stack = vec![
            user(
                0x1400,
                0,
                vec![line(
                    "hashbrown::raw::RawTable<T,A>::reserve_rehash",
                    Some("hashbrown/src/raw/mod.rs"),
                    Some(1083),
                )],
            ),
            user(0x1300, 0, vec![line("main", Some("src/main.rs"), Some(3))]),
        ];
        let grown = TimeSlice {
            value: 3_500_000_000,
            ..slice(1500, 0)
        };
        model::Profile {
            kind: model::ProfileKind::AddressSpace,
            samples: vec![ModelSample {
                stack: rehash_stack,
                value: 3_500_000_000,
                count: 1,
                labels: labels(101, ThreadState::Runnable),
                timeline: vec![grown],
            }],
            ..sample_profile()
        }
    }

    /// The envelope of a second profile of the same capture.
    fn address_space_envelope() -> Envelope {
        Envelope {
            profile_id: [7; 16],
            original_pprof: Some(vec![0x1f, 0x8b, 4, 5]),
            ..envelope()
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            resource: vec![
                Attribute::str("service.name", "feed"),
                Attribute::int("process.pid", 100),
                Attribute::str("service.name", "shadowed"),
            ],
            dropped_resource_attributes: 4,
            attributes: vec![
                Attribute::str("freezeframe.rule.name", "feed-latency"),
                Attribute::new("freezeframe.rule.value", Value::Double(0.75)).with_unit("s"),
            ],
            profile_id: [9; 16],
            original_pprof: Some(vec![0x1f, 0x8b, 1, 2, 3]),
        }
    }

    fn encoded() -> ExportProfilesServiceRequest {
        // Through the wire format, as a receiver sees it.
        let bytes = request(&sample_profile(), &envelope()).encode_to_vec();
        ExportProfilesServiceRequest::decode(bytes.as_slice()).unwrap()
    }

    fn only_profile(request: &ExportProfilesServiceRequest) -> &Profile {
        &request.resource_profiles[0].scope_profiles[0].profiles[0]
    }

    fn text(dictionary: &ProfilesDictionary, index: i32) -> &str {
        &dictionary.string_table[index as usize]
    }

    fn attribute_pairs(dictionary: &ProfilesDictionary, indices: &[i32]) -> Vec<(String, String)> {
        indices
            .iter()
            .map(|&index| {
                let attribute = &dictionary.attribute_table[index as usize];
                let value = match attribute.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(text)) => text.clone(),
                    Some(any_value::Value::IntValue(number)) => number.to_string(),
                    Some(any_value::Value::DoubleValue(number)) => number.to_string(),
                    other => format!("{other:?}"),
                };
                (text(dictionary, attribute.key_strindex).to_string(), value)
            })
            .collect()
    }

    fn function_names(dictionary: &ProfilesDictionary, stack_index: i32) -> Vec<String> {
        dictionary.stack_table[stack_index as usize]
            .location_indices
            .iter()
            .map(|&location| {
                let location = &dictionary.location_table[location as usize];
                let line = location.lines.last().unwrap();
                let function = &dictionary.function_table[line.function_index as usize];
                text(dictionary, function.name_strindex).to_string()
            })
            .collect()
    }

    #[test]
    fn every_table_starts_with_its_zero_value() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        assert_eq!(dictionary.string_table[0], "");
        assert_eq!(dictionary.mapping_table[0], Mapping::default());
        assert_eq!(dictionary.location_table[0], Location::default());
        assert_eq!(dictionary.function_table[0], Function::default());
        assert_eq!(dictionary.link_table[0], Link::default());
        assert_eq!(dictionary.attribute_table[0], KeyValueAndUnit::default());
        assert_eq!(dictionary.stack_table[0], Stack::default());
    }

    #[test]
    fn an_empty_profile_still_has_every_zero_value() {
        let empty = model::Profile {
            kind: model::ProfileKind::OffCpu,
            start: at_ms(0),
            duration: Duration::from_secs(1),
            samples: Vec::new(),
            mappings: Vec::new(),
            comments: Vec::new(),
        };
        let request = request(&empty, &Envelope::default());
        let dictionary = request.dictionary.unwrap();
        assert_eq!(
            dictionary.string_table.len(),
            3,
            "\"\", off_cpu, nanoseconds"
        );
        for length in [
            dictionary.mapping_table.len(),
            dictionary.location_table.len(),
            dictionary.function_table.len(),
            dictionary.link_table.len(),
            dictionary.attribute_table.len(),
            dictionary.stack_table.len(),
        ] {
            assert_eq!(length, 1);
        }
    }

    #[test]
    fn tables_hold_no_duplicates() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        fn distinct<T: Message>(items: &[T]) -> usize {
            items
                .iter()
                .map(Message::encode_to_vec)
                .collect::<HashSet<_>>()
                .len()
        }
        let strings: HashSet<&String> = dictionary.string_table.iter().collect();
        assert_eq!(strings.len(), dictionary.string_table.len());
        assert_eq!(
            distinct(&dictionary.mapping_table),
            dictionary.mapping_table.len()
        );
        assert_eq!(
            distinct(&dictionary.location_table),
            dictionary.location_table.len()
        );
        assert_eq!(
            distinct(&dictionary.function_table),
            dictionary.function_table.len()
        );
        assert_eq!(
            distinct(&dictionary.link_table),
            dictionary.link_table.len()
        );
        assert_eq!(
            distinct(&dictionary.attribute_table),
            dictionary.attribute_table.len()
        );
        assert_eq!(
            distinct(&dictionary.stack_table),
            dictionary.stack_table.len()
        );
        // zero + schedule (at two addresses, one function), futex_wait,
        // Mutex::lock, serve, main, read, [truncated], and the lock wait's
        // detail frame.
        assert_eq!(dictionary.function_table.len(), 9);
        // zero + four frames of the sleep stack + three of the read stack +
        // the detail frame.
        assert_eq!(dictionary.location_table.len(), 9);
        // zero + the sleep stack (shared by three samples) + the read stack
        // under its detail frame.
        assert_eq!(dictionary.stack_table.len(), 3);
    }

    #[test]
    fn every_index_is_in_range() {
        assert_indices_in_range(&encoded());
    }

    /// Every index of every profile in `request`, and of its dictionary,
    /// points into the dictionary.
    fn assert_indices_in_range(request: &ExportProfilesServiceRequest) {
        let dictionary = request.dictionary.as_ref().unwrap();
        let in_range = |index: i32, length: usize| (0..length as i32).contains(&index);
        let profiles = request
            .resource_profiles
            .iter()
            .flat_map(|resource| &resource.scope_profiles)
            .flat_map(|scope| &scope.profiles);
        for profile in profiles {
            let sample_type = profile.sample_type.as_ref().unwrap();
            for index in [sample_type.type_strindex, sample_type.unit_strindex] {
                assert!(in_range(index, dictionary.string_table.len()) && index != 0);
            }
            for &index in &profile.attribute_indices {
                assert!(in_range(index, dictionary.attribute_table.len()) && index != 0);
            }
            for sample in &profile.samples {
                assert!(in_range(sample.stack_index, dictionary.stack_table.len()));
                assert_ne!(sample.stack_index, 0, "every sample here has a stack");
                assert!(in_range(sample.link_index, dictionary.link_table.len()));
                for &index in &sample.attribute_indices {
                    assert!(in_range(index, dictionary.attribute_table.len()) && index != 0);
                }
            }
        }
        for stack in &dictionary.stack_table {
            for &index in &stack.location_indices {
                assert!(in_range(index, dictionary.location_table.len()) && index != 0);
            }
        }
        for location in &dictionary.location_table {
            assert!(in_range(
                location.mapping_index,
                dictionary.mapping_table.len()
            ));
            for line in &location.lines {
                assert!(in_range(
                    line.function_index,
                    dictionary.function_table.len()
                ));
            }
        }
        for function in &dictionary.function_table {
            assert!(in_range(
                function.name_strindex,
                dictionary.string_table.len()
            ));
            assert!(in_range(
                function.filename_strindex,
                dictionary.string_table.len()
            ));
        }
        for attribute in &dictionary.attribute_table {
            assert!(in_range(
                attribute.key_strindex,
                dictionary.string_table.len()
            ));
            assert!(in_range(
                attribute.unit_strindex,
                dictionary.string_table.len()
            ));
        }
    }

    #[test]
    fn the_sample_type_is_off_cpu_nanoseconds_without_a_period() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        let profile = only_profile(&request);
        let sample_type = profile.sample_type.as_ref().unwrap();
        assert_eq!(text(dictionary, sample_type.type_strindex), "off_cpu");
        assert_eq!(text(dictionary, sample_type.unit_strindex), "nanoseconds");
        assert_eq!(profile.period_type, None);
        assert_eq!(profile.period, 0);
        assert_eq!(profile.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(profile.duration_nano, 2_000_000_000);
        assert_eq!(profile.profile_id, [9; 16]);
        assert_eq!(profile.original_payload_format, "pprof");
        assert_eq!(profile.original_payload, [0x1f, 0x8b, 1, 2, 3]);
        assert_eq!(
            attribute_pairs(dictionary, &profile.attribute_indices),
            [
                (
                    "freezeframe.rule.name".to_string(),
                    "feed-latency".to_string()
                ),
                ("freezeframe.rule.value".to_string(), "0.75".to_string()),
            ]
        );
        let value = &dictionary.attribute_table[profile.attribute_indices[1] as usize];
        assert_eq!(text(dictionary, value.unit_strindex), "s");
    }

    #[test]
    fn an_address_space_profile_is_alloc_space_bytes_named_by_its_period() {
        let request = request(&address_space_profile(), &envelope());
        let dictionary = request.dictionary.as_ref().unwrap();
        let profile = only_profile(&request);
        let sample_type = profile.sample_type.as_ref().unwrap();
        assert_eq!(
            (
                text(dictionary, sample_type.type_strindex),
                text(dictionary, sample_type.unit_strindex)
            ),
            ("alloc_space", "bytes")
        );
        let period_type = profile.period_type.as_ref().unwrap();
        assert_eq!(
            (
                text(dictionary, period_type.type_strindex),
                text(dictionary, period_type.unit_strindex)
            ),
            ("address_space", "bytes"),
            "Pyroscope names the series `address_space`"
        );
        assert_eq!(profile.period, 1);
        assert_eq!(profile.samples[0].values, [3_500_000_000]);
        assert_eq!(
            profile.samples[0].timestamps_unix_nano,
            [unix_nanos(at_ms(1500))]
        );
    }

    #[test]
    fn several_profiles_share_one_dictionary() {
        let off_cpu = sample_profile();
        let address_space = address_space_profile();
        let bytes = combined_request(&[
            (&off_cpu, &envelope()),
            (&address_space, &address_space_envelope()),
        ])
        .encode_to_vec();
        let request = ExportProfilesServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_indices_in_range(&request);
        let dictionary = request.dictionary.as_ref().unwrap();

        assert_eq!(request.resource_profiles.len(), 1, "one resource");
        let profiles = &request.resource_profiles[0].scope_profiles[0].profiles;
        let sample_types: Vec<(&str, &str)> = profiles
            .iter()
            .map(|profile| {
                let sample_type = profile.sample_type.as_ref().unwrap();
                (
                    text(dictionary, sample_type.type_strindex),
                    text(dictionary, sample_type.unit_strindex),
                )
            })
            .collect();
        assert_eq!(
            sample_types,
            [("off_cpu", "nanoseconds"), ("alloc_space", "bytes")]
        );
        assert_eq!(profiles[0].profile_id, [9; 16]);
        assert_eq!(profiles[1].profile_id, [7; 16]);
        assert_eq!(profiles[1].original_payload, [0x1f, 0x8b, 4, 5]);
        assert_eq!(profiles[0].samples.len(), 4);
        assert_eq!(
            function_names(dictionary, profiles[1].samples[0].stack_index),
            ["hashbrown::raw::RawTable<T,A>::reserve_rehash", "main"]
        );

        // What the profiles have in common is stored once.
        let apps = dictionary
            .mapping_table
            .iter()
            .filter(|m| text(dictionary, m.filename_strindex) == "/usr/bin/app")
            .count();
        assert_eq!(apps, 1);
        // zero + the off-CPU profile's eight + reserve_rehash.
        assert_eq!(dictionary.function_table.len(), 10);
        let main_locations: HashSet<i32> = [&profiles[0].samples[0], &profiles[1].samples[0]]
            .iter()
            .map(|sample| {
                *dictionary.stack_table[sample.stack_index as usize]
                    .location_indices
                    .last()
                    .unwrap()
            })
            .collect();
        assert_eq!(main_locations.len(), 1, "one `main` location for both");
    }

    #[test]
    fn profiles_of_different_resources_are_grouped_by_resource() {
        let mut other = address_space_envelope();
        other.resource = vec![Attribute::str("service.name", "search")];
        let (first, second) = (sample_profile(), address_space_profile());
        let request = combined_request(&[
            (&first, &envelope()),
            (&second, &other),
            (&second, &address_space_envelope()),
        ]);
        assert_indices_in_range(&request);
        let counts: Vec<usize> = request
            .resource_profiles
            .iter()
            .map(|resource| resource.scope_profiles[0].profiles.len())
            .collect();
        assert_eq!(counts, [2, 1]);
        let second_resource = request.resource_profiles[1].resource.as_ref().unwrap();
        assert_eq!(
            second_resource.attributes[0].value,
            Some(AnyValue {
                value: Some(any_value::Value::StringValue("search".into()))
            })
        );
    }

    #[test]
    fn samples_carry_their_time_per_slice_and_stay_within_the_profile() {
        let request = encoded();
        let profile = only_profile(&request);
        // The linked and the unlinked part of thread 101 stay apart; the
        // other two samples are whole.
        assert_eq!(profile.samples.len(), 4);
        let linked = &profile.samples[0];
        assert_eq!(linked.values, [400_000_000, 500_000_000]);
        let start = profile.time_unix_nano;
        assert_eq!(
            linked.timestamps_unix_nano,
            [start + 500_000_000, start + 1_000_000_000]
        );
        let whole = &profile.samples[2];
        assert_eq!(
            (
                whole.values.as_slice(),
                whole.timestamps_unix_nano.as_slice()
            ),
            (&[2_000_000][..], &[start][..])
        );
        for sample in &profile.samples {
            assert_eq!(sample.values.len(), sample.timestamps_unix_nano.len());
            for &timestamp in &sample.timestamps_unix_nano {
                assert!(timestamp >= start && timestamp < start + profile.duration_nano);
            }
        }
    }

    #[test]
    fn links_and_sample_attributes() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        let profile = only_profile(&request);
        let linked = &profile.samples[0];
        let link = &dictionary.link_table[linked.link_index as usize];
        assert_eq!(
            (link.trace_id.as_slice(), link.span_id.as_slice()),
            (&LINK.trace_id[..], &LINK.span_id[..])
        );
        assert_eq!(profile.samples[1].link_index, 0);
        let mut attributes = attribute_pairs(dictionary, &linked.attribute_indices);
        attributes.sort();
        assert_eq!(
            attributes,
            [
                ("thread.name".to_string(), "worker".to_string()),
                ("thread.state".to_string(), "S".to_string()),
            ],
            "the ids are a link, and the thread id no series label"
        );
        let locked = attribute_pairs(dictionary, &profile.samples[3].attribute_indices);
        assert!(locked.contains(&("lock.kind".to_string(), "mmap_lock".to_string())));
        assert!(locked.contains(&("thread.state".to_string(), "D".to_string())));
    }

    #[test]
    fn samples_of_one_identity_are_merged_in_time_order() {
        let mut profile = sample_profile();
        let mut late = profile.samples[1].clone();
        late.timeline = vec![slice(1800, 7)];
        let early = ModelSample {
            timeline: vec![slice(100, 5)],
            ..profile.samples[1].clone()
        };
        profile.samples.push(late);
        profile.samples.push(early);
        let request = request(&profile, &envelope());
        let merged = &only_profile(&request).samples[1];
        let start = unix_nanos(at_ms(0));
        assert_eq!(merged.values, [5_000_000, 100_000_000, 7_000_000]);
        assert_eq!(
            merged.timestamps_unix_nano,
            [
                start + 100_000_000,
                start + 1_500_000_000,
                start + 1_800_000_000
            ]
        );
    }

    #[test]
    fn stacks_are_leaf_first_and_frames_typed() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        let profile = only_profile(&request);
        assert_eq!(
            function_names(dictionary, profile.samples[0].stack_index),
            ["schedule", "futex_wait", "app::serve", "main"]
        );
        let stack = &dictionary.stack_table[profile.samples[0].stack_index as usize];
        let inlined = &dictionary.location_table[stack.location_indices[2] as usize];
        assert_eq!(inlined.lines.len(), 2);
        assert_eq!(inlined.lines[0].line, 40);
        let kernel_frame = &dictionary.location_table[stack.location_indices[0] as usize];
        assert_eq!(
            attribute_pairs(dictionary, &kernel_frame.attribute_indices),
            [("profile.frame.type".to_string(), "kernel".to_string())]
        );
        assert_eq!(
            attribute_pairs(dictionary, &inlined.attribute_indices),
            [("profile.frame.type".to_string(), "native".to_string())]
        );
    }

    #[test]
    fn kernel_and_user_frames_at_one_address_stay_apart() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        let profile = only_profile(&request);
        let stack = &dictionary.stack_table[profile.samples[3].stack_index as usize];
        let location =
            |position: usize| &dictionary.location_table[stack.location_indices[position] as usize];
        let detail = location(0);
        assert_eq!(
            (
                detail.mapping_index,
                detail.address,
                &detail.attribute_indices
            ),
            (0, 0, &Vec::new()),
            "a detail frame is in no mapping, and of no frame type"
        );
        let (kernel, user, truncated) = (location(1), location(2), location(3));
        assert_eq!(
            (kernel.address, user.address),
            (SHARED_ADDRESS, SHARED_ADDRESS)
        );
        assert_ne!(kernel.mapping_index, user.mapping_index);
        let kernel_mapping = &dictionary.mapping_table[kernel.mapping_index as usize];
        assert_eq!(
            text(dictionary, kernel_mapping.filename_strindex),
            KERNEL_MAPPING
        );
        assert!(kernel_mapping.memory_start <= SHARED_ADDRESS);
        assert!(kernel_mapping.memory_limit > KERNEL_ADDRESS + 0x1000);
        assert_eq!(truncated.mapping_index, 0);
        assert!(truncated.attribute_indices.is_empty());
    }

    #[test]
    fn mappings_carry_build_ids() {
        let request = encoded();
        let dictionary = request.dictionary.as_ref().unwrap();
        let app = dictionary
            .mapping_table
            .iter()
            .find(|m| text(dictionary, m.filename_strindex) == "/usr/bin/app")
            .unwrap();
        assert_eq!(
            attribute_pairs(dictionary, &app.attribute_indices),
            [(
                "process.executable.build_id.gnu".to_string(),
                "abcdef0123456789".to_string()
            )]
        );
        let libc = dictionary
            .mapping_table
            .iter()
            .find(|m| text(dictionary, m.filename_strindex) == "/usr/lib/libc.so.6")
            .unwrap();
        assert!(libc.attribute_indices.is_empty());
        assert_eq!(
            (libc.memory_start, libc.memory_limit, libc.file_offset),
            (0x4000, 0x6000, 0x1000)
        );
    }

    #[test]
    fn resource_attributes_keep_the_first_of_each_key() {
        let request = encoded();
        let resource = request.resource_profiles[0].resource.as_ref().unwrap();
        let keys: Vec<&str> = resource
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        assert_eq!(keys, ["service.name", "process.pid"]);
        assert_eq!(
            resource.dropped_attributes_count, 4,
            "what was left out is counted"
        );
        assert_eq!(
            resource.attributes[0].value,
            Some(AnyValue {
                value: Some(any_value::Value::StringValue("feed".into()))
            })
        );
        let scope = request.resource_profiles[0].scope_profiles[0]
            .scope
            .as_ref()
            .unwrap();
        assert_eq!(scope.name, "freezeframe");
    }

    #[test]
    fn a_malformed_link_label_is_neither_a_link_nor_an_attribute() {
        let mut profile = sample_profile();
        profile.samples[2]
            .labels
            .set(crate::profile::labels::Key::TraceId, "not-hex");
        let request = request(&profile, &envelope());
        let dictionary = request.dictionary.as_ref().unwrap();
        let sample = &only_profile(&request).samples[2];
        assert_eq!(sample.link_index, 0);
        assert!(attribute_pairs(dictionary, &sample.attribute_indices)
            .iter()
            .all(|(key, _)| key != "trace_id"));
    }
}
