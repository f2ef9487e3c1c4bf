//! pprof: google's `profile.proto`, gzipped, the format `go tool pprof`,
//! Pyroscope and OTLP's `original_payload` all read.
//!
//! Each model sample becomes one pprof sample with the values `[count,
//! value]`, typed by the profile's kind: `[events/count, off_cpu/nanoseconds]`
//! for off-CPU time, `[calls/count, alloc_space/bytes]` for address-space
//! changes. The value type is also the default sample type, and it is how
//! [`decode`] tells the kinds apart; the period type is the kind's own (see
//! [`ProfileKind::period_type`]). Strings, functions and locations are
//! deduplicated into pprof's id-referenced tables. Kernel frames point at
//! one synthetic `[kernel.kallsyms]` mapping, so a kernel and a user frame
//! at the same numeric address stay apart.
//!
//! Labels are written as [`labels`](crate::profile::labels) maps them for
//! the pprof's target: all of them in a file, the series labels and leaf
//! frames of detail in a Pyroscope push.
//!
//! The messages are written out by hand (no protoc, no build script); their
//! field numbers are those of `perftools.profiles` in google/pprof.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message;

use super::EncodeError;
use crate::profile::labels::{Key, Target, Value, PROCESS_ID, STATE, THREAD_ID, THREAD_NAME};
use crate::profile::{
    self as model, Frame, FrameKind, ProfileKind, SampleLabels, ThreadState, NOT_READ_FRAME,
    TRUNCATED_FRAME,
};

/// File name of the synthetic mapping every kernel frame points at; `perf`
/// and pprof's own Linux tooling use the same name.
pub const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// Decompressed pprofs larger than this are refused: the largest real
/// capture is a few MiB, so anything bigger is corrupt or a gzip bomb.
const MAX_DECOMPRESSED_BYTES: u64 = 256 << 20;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// `perftools.profiles.Profile`: the whole profile and its tables.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each entry of [`Sample::value`] measures.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string the profile uses; `string_table[0]` is always `""`.
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// String index of a regexp of frames to drop, with their callees.
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    /// String index of a regexp of frames to keep despite `drop_frames`.
    #[prost(int64, tag = "8")]
    pub keep_frames: i64,
    /// Start of the collection, in nanoseconds since the Unix epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// String indices of free-form notes.
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// String index of the type of the sample value shown by default.
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`: the meaning and unit of a value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    /// String index.
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// String index.
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`: values measured at one stack.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Location ids, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per [`Profile::sample_type`].
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`: a key with either a string or a number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// String index.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String index, when the label is a string.
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    /// String index of the unit of `num`.
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `perftools.profiles.Mapping`: a file mapped into the address space.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    /// Nonzero.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// String index.
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// String index.
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `perftools.profiles.Location`: one address and the lines it stands for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    /// Nonzero.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// 0 when the location belongs to no mapping.
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Innermost first: the last line is the caller the others were
    /// inlined into.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// `perftools.profiles.Line`: a source position inside a function.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// 0 when unknown.
    #[prost(int64, tag = "2")]
    pub line: i64,
    #[prost(int64, tag = "3")]
    pub column: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    /// Nonzero.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// String index of the human-readable name.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// String index of the name as the system knows it (e.g. mangled).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// String index of the source file.
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Encodes `profile` as a gzipped pprof, ready to be written to a `.pb.gz`.
pub fn encode(profile: &model::Profile) -> Vec<u8> {
    encode_for(profile, Target::Files)
}

/// Encodes `profile` as a gzipped pprof with its labels as `target` maps
/// them: every label for the files, the few series labels (and the rest as
/// leaf frames) for a Pyroscope push.
pub fn encode_for(profile: &model::Profile, target: Target) -> Vec<u8> {
    let raw = to_message_for(profile, target).encode_to_vec();
    let mut gzip = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
    gzip.write_all(&raw).expect("gzip into a Vec cannot fail");
    gzip.finish().expect("gzip into a Vec cannot fail")
}

/// Builds the (unserialized) pprof message of a file for `profile`.
pub fn to_message(profile: &model::Profile) -> Profile {
    to_message_for(profile, Target::Files)
}

/// Builds the (unserialized) pprof message for `profile` and `target`.
pub fn to_message_for(profile: &model::Profile, target: Target) -> Profile {
    let mut tables = Tables::default();
    let value_type = tables.value_type(profile.kind.value_type());
    let count_type = tables.value_type(profile.kind.count_type());

    let (mapping, kernel_mapping_id) = mappings(profile, &mut tables);

    let sample = profile
        .samples
        .iter()
        .map(|sample| {
            let mapped = sample.labels.mapped(target);
            let details: Vec<Frame> = mapped.frames.into_iter().map(Frame::detail).collect();
            let location_id = details
                .iter()
                .chain(&sample.stack)
                .map(|frame| {
                    let mapping_id = match frame.kind {
                        FrameKind::Kernel => kernel_mapping_id.unwrap_or(0),
                        FrameKind::Truncated | FrameKind::Detail => 0,
                        // An index past the mapping table is a capture bug;
                        // the frame is still worth showing without its file.
                        FrameKind::User => frame
                            .mapping
                            .filter(|&index| index < profile.mappings.len())
                            .map_or(0, |index| index as u64 + 1),
                    };
                    tables.location(frame, mapping_id)
                })
                .collect();
            Sample {
                location_id,
                value: vec![saturating_i64(sample.count), saturating_i64(sample.value)],
                label: tables.labels(&mapped.labels),
            }
        })
        .collect();

    let comment = profile
        .comments
        .iter()
        .map(|comment| tables.string(comment))
        .collect();
    let default_sample_type = value_type.r#type;
    // As in the OTLP profile, so that Pyroscope gives a capture pushed as
    // pprof the profile type id it gives the same capture over OTLP.
    let period_type = profile
        .kind
        .period_type()
        .map(|period_type| tables.value_type(period_type));
    Profile {
        sample_type: vec![count_type, value_type.clone()],
        sample,
        mapping,
        location: tables.location,
        function: tables.function,
        string_table: tables.string_table,
        time_nanos: unix_nanos(profile.start),
        duration_nanos: saturating_i64(profile.duration.as_nanos()),
        period: i64::from(period_type.is_some()),
        period_type,
        comment,
        default_sample_type,
        ..Profile::default()
    }
}

/// The model's mappings, with ids from 1 in model order, then the synthetic
/// kernel mapping if any frame is a kernel one; returns its id too.
fn mappings(profile: &model::Profile, tables: &mut Tables) -> (Vec<Mapping>, Option<u64>) {
    // One pass learns how well each mapping is symbolized and which kernel
    // addresses occur.
    let mut user_resolution: Vec<Resolution> = profile
        .mappings
        .iter()
        .map(|_| Resolution::default())
        .collect();
    let mut kernel_resolution = Resolution::default();
    let mut kernel_range: Option<(u64, u64)> = None;
    for frame in profile.samples.iter().flat_map(|sample| &sample.stack) {
        match frame.kind {
            FrameKind::User => {
                if let Some(resolution) = frame.mapping.and_then(|i| user_resolution.get_mut(i)) {
                    resolution.add(frame);
                }
            }
            FrameKind::Kernel => {
                kernel_resolution.add(frame);
                let (low, high) = kernel_range.get_or_insert((frame.address, frame.address));
                *low = (*low).min(frame.address);
                *high = (*high).max(frame.address);
            }
            FrameKind::Truncated | FrameKind::Detail => {}
        }
    }

    let mut mapping: Vec<Mapping> = profile
        .mappings
        .iter()
        .zip(user_resolution)
        .zip(1..)
        .map(|((file, resolution), id)| Mapping {
            id,
            memory_start: file.memory_start,
            memory_limit: file.memory_limit,
            file_offset: file.file_offset,
            filename: tables.string(&file.file),
            build_id: file.build_id.as_deref().map_or(0, |id| tables.string(id)),
            ..resolution.into_mapping()
        })
        .collect();
    // The synthetic kernel mapping spans exactly the kernel addresses seen,
    // so every kernel location lies inside its mapping as pprof expects.
    let kernel_mapping_id = kernel_range.map(|(low, high)| {
        let id = mapping.len() as u64 + 1;
        mapping.push(Mapping {
            id,
            memory_start: low,
            memory_limit: high.saturating_add(1),
            filename: tables.string(KERNEL_MAPPING),
            ..kernel_resolution.into_mapping()
        });
        id
    });
    (mapping, kernel_mapping_id)
}

/// Reads a pprof, gzipped or not, back into the model: the inverse of
/// [`encode`] for freezeframe's own files.
///
/// The first sample type that is some [`ProfileKind`]'s value type decides
/// the kind; a pprof with none (a CPU or heap profile of another tool) is
/// [`EncodeError::UnknownSampleTypes`].
///
/// Frames in the `[kernel.kallsyms]` mapping become kernel frames and the
/// `[truncated]` function becomes the truncation marker. Labels other than
/// `thread_id`, `process_id`, `thread_name` and `state` land in
/// [`SampleLabels::extra`] (numeric ones as decimal text).
pub fn decode(bytes: &[u8]) -> Result<model::Profile, EncodeError> {
    decode_limited(bytes, MAX_DECOMPRESSED_BYTES)
}

fn decode_limited(bytes: &[u8], limit_bytes: u64) -> Result<model::Profile, EncodeError> {
    let message = if bytes.starts_with(&GZIP_MAGIC) {
        let mut raw = Vec::new();
        // One byte past the limit tells "exactly at the limit" from "beyond".
        MultiGzDecoder::new(bytes)
            .take(limit_bytes + 1)
            .read_to_end(&mut raw)
            .map_err(EncodeError::Gzip)?;
        if raw.len() as u64 > limit_bytes {
            return Err(EncodeError::TooLarge { limit_bytes });
        }
        Profile::decode(raw.as_slice())
    } else {
        Profile::decode(bytes)
    }
    .map_err(EncodeError::Protobuf)?;
    Decoder::new(&message)?.profile()
}

/// The dictionaries of a pprof under construction: each string, function
/// and location is stored once and referred to by index or id.
struct Tables {
    string_table: Vec<String>,
    string_index: HashMap<String, i64>,
    function: Vec<Function>,
    /// Keyed by (name, file) string indices.
    function_ids: HashMap<(i64, i64), u64>,
    location: Vec<Location>,
    location_ids: HashMap<LocationKey, u64>,
}

/// (mapping id, address, (function id, line) per line): the mapping keeps
/// kernel and user addresses apart, the lines keep the truncation marker
/// apart from any real frame.
type LocationKey = (u64, u64, Vec<(u64, i64)>);

impl Default for Tables {
    fn default() -> Self {
        Tables {
            string_table: vec![String::new()],
            string_index: HashMap::from([(String::new(), 0)]),
            function: Vec::new(),
            function_ids: HashMap::new(),
            location: Vec::new(),
            location_ids: HashMap::new(),
        }
    }
}

impl Tables {
    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.string_index.get(text) {
            return index;
        }
        let index = self.string_table.len() as i64;
        self.string_table.push(text.to_string());
        self.string_index.insert(text.to_string(), index);
        index
    }

    fn value_type(&mut self, (type_name, unit): (&str, &str)) -> ValueType {
        ValueType {
            r#type: self.string(type_name),
            unit: self.string(unit),
        }
    }

    fn function(&mut self, line: &model::Line) -> u64 {
        let name = self.string(&line.function);
        let filename = line.file.as_deref().map_or(0, |file| self.string(file));
        *self
            .function_ids
            .entry((name, filename))
            .or_insert_with(|| {
                let id = self.function.len() as u64 + 1;
                // Only the demangled name is known, so it doubles as the system
                // name rather than leaving pprof an empty one.
                self.function.push(Function {
                    id,
                    name,
                    system_name: name,
                    filename,
                    start_line: 0,
                });
                id
            })
    }

    fn location(&mut self, frame: &Frame, mapping_id: u64) -> u64 {
        let line: Vec<Line> = frame
            .lines
            .iter()
            .map(|line| Line {
                function_id: self.function(line),
                line: line.line.map_or(0, i64::from),
                column: 0,
            })
            .collect();
        let key = (
            mapping_id,
            frame.address,
            line.iter().map(|l| (l.function_id, l.line)).collect(),
        );
        *self.location_ids.entry(key).or_insert_with(|| {
            let id = self.location.len() as u64 + 1;
            self.location.push(Location {
                id,
                mapping_id,
                address: frame.address,
                line,
                is_folded: false,
            });
            id
        })
    }

    fn labels(&mut self, labels: &[(std::borrow::Cow<'_, str>, Value<'_>)]) -> Vec<Label> {
        labels
            .iter()
            .map(|(key, value)| match value {
                Value::Int(num) => Label {
                    key: self.string(key),
                    num: *num,
                    ..Label::default()
                },
                Value::Str(text) => Label {
                    key: self.string(key),
                    str: self.string(text),
                    ..Label::default()
                },
            })
            .collect()
    }
}

/// How completely the frames of one mapping are symbolized. pprof reads
/// these flags to decide whether it may symbolize the mapping itself.
struct Resolution {
    has_functions: bool,
    has_filenames: bool,
    has_line_numbers: bool,
    has_inline_frames: bool,
}

impl Default for Resolution {
    /// A mapping no frame points into has nothing left to symbolize.
    fn default() -> Self {
        Resolution {
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: false,
        }
    }
}

impl Resolution {
    fn add(&mut self, frame: &Frame) {
        self.has_inline_frames |= frame.lines.len() > 1;
        for line in &frame.lines {
            // The symbolizer names a miss `[unknown] file+0xoffset`.
            self.has_functions &= !line.function.starts_with("[unknown]");
            self.has_filenames &= line.file.is_some();
            self.has_line_numbers &= line.line.is_some();
        }
    }

    fn into_mapping(self) -> Mapping {
        Mapping {
            has_functions: self.has_functions,
            has_filenames: self.has_filenames,
            has_line_numbers: self.has_line_numbers,
            has_inline_frames: self.has_inline_frames,
            ..Mapping::default()
        }
    }
}

/// Resolves a decoded pprof's ids and string indices back into the model.
struct Decoder<'a> {
    message: &'a Profile,
    /// pprof mapping id to index in the model's mapping table.
    mapping_index: HashMap<u64, usize>,
    kernel_mapping_ids: HashSet<u64>,
    mappings: Vec<model::Mapping>,
    functions: HashMap<u64, &'a Function>,
    frames: HashMap<u64, Frame>,
    kind: ProfileKind,
    /// Positions of the two values inside each sample's `value`.
    count_position: usize,
    value_position: usize,
}

impl<'a> Decoder<'a> {
    fn new(message: &'a Profile) -> Result<Self, EncodeError> {
        let kind = profile_kind(message)?;
        let mut decoder = Decoder {
            message,
            mapping_index: HashMap::new(),
            kernel_mapping_ids: HashSet::new(),
            mappings: Vec::new(),
            functions: message
                .function
                .iter()
                .map(|function| (function.id, function))
                .collect(),
            frames: HashMap::new(),
            kind,
            count_position: sample_type_position(message, kind.count_type())?,
            value_position: sample_type_position(message, kind.value_type())?,
        };
        for mapping in &message.mapping {
            let file = decoder.string(mapping.filename)?;
            if file.starts_with(KERNEL_MAPPING) {
                decoder.kernel_mapping_ids.insert(mapping.id);
                continue;
            }
            let build_id = decoder.string(mapping.build_id)?;
            decoder
                .mapping_index
                .insert(mapping.id, decoder.mappings.len());
            decoder.mappings.push(model::Mapping {
                memory_start: mapping.memory_start,
                memory_limit: mapping.memory_limit,
                file_offset: mapping.file_offset,
                file: file.to_string(),
                build_id: (!build_id.is_empty()).then(|| build_id.to_string()),
            });
        }
        for location in &message.location {
            let frame = decoder.frame(location)?;
            decoder.frames.insert(location.id, frame);
        }
        Ok(decoder)
    }

    fn profile(self) -> Result<model::Profile, EncodeError> {
        let samples = self
            .message
            .sample
            .iter()
            .map(|sample| self.sample(sample))
            .collect::<Result<_, _>>()?;
        let comments = self
            .message
            .comment
            .iter()
            .map(|&index| self.string(index).map(str::to_string))
            .collect::<Result<_, _>>()?;
        Ok(model::Profile {
            kind: self.kind,
            start: from_unix_nanos(self.message.time_nanos)?,
            duration: Duration::from_nanos(non_negative(
                "duration_nanos",
                self.message.duration_nanos,
            )?),
            samples,
            mappings: self.mappings,
            comments,
        })
    }

    fn string(&self, index: i64) -> Result<&'a str, EncodeError> {
        string_at(self.message, index)
    }

    fn frame(&self, location: &Location) -> Result<Frame, EncodeError> {
        let (is_kernel, mapping) = match location.mapping_id {
            0 => (false, None),
            id if self.kernel_mapping_ids.contains(&id) => (true, None),
            id => {
                let index = self.mapping_index.get(&id).ok_or(EncodeError::UnknownId {
                    table: "mapping",
                    id,
                })?;
                (false, Some(*index))
            }
        };
        let mut lines = location
            .line
            .iter()
            .map(|line| self.line(line))
            .collect::<Result<Vec<_>, _>>()?;
        // Other producers may leave a location unsymbolized; the model wants
        // a name on every frame, so give it the symbolizer's miss form.
        if lines.is_empty() {
            let function = match mapping.map(|index| &self.mappings[index]) {
                Some(file) => {
                    let offset = (location.address.wrapping_sub(file.memory_start))
                        .wrapping_add(file.file_offset);
                    format!("[unknown] {}+{offset:#x}", file.file)
                }
                None => format!("[unknown] {:#x}", location.address),
            };
            lines.push(model::Line {
                function,
                file: None,
                line: None,
            });
        }
        let kind = if is_kernel {
            FrameKind::Kernel
        } else if mapping.is_none()
            && matches!(lines.as_slice(),
                [model::Line { function, file: None, line: None }]
                    if function == TRUNCATED_FRAME || function == NOT_READ_FRAME)
        {
            FrameKind::Truncated
        } else {
            FrameKind::User
        };
        Ok(Frame {
            kind,
            address: location.address,
            mapping,
            lines,
        })
    }

    fn line(&self, line: &Line) -> Result<model::Line, EncodeError> {
        let id = line.function_id;
        let function = self.functions.get(&id).ok_or(EncodeError::UnknownId {
            table: "function",
            id,
        })?;
        let file = self.string(function.filename)?;
        Ok(model::Line {
            function: self.string(function.name)?.to_string(),
            file: (!file.is_empty()).then(|| file.to_string()),
            // pprof writes 0 for an unknown line.
            line: u32::try_from(line.line).ok().filter(|&number| number != 0),
        })
    }

    fn sample(&self, sample: &Sample) -> Result<model::Sample, EncodeError> {
        let expected = self.message.sample_type.len();
        if sample.value.len() != expected {
            return Err(EncodeError::ValueCount {
                expected,
                found: sample.value.len(),
            });
        }
        let stack = sample
            .location_id
            .iter()
            .map(|&id| {
                self.frames.get(&id).cloned().ok_or(EncodeError::UnknownId {
                    table: "location",
                    id,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(model::Sample {
            stack,
            value: non_negative("sample.value", sample.value[self.value_position])?,
            count: non_negative("sample.value", sample.value[self.count_position])?,
            labels: self.labels(&sample.label)?,
            // pprof has no place for it.
            timeline: Vec::new(),
        })
    }

    fn labels(&self, labels: &[Label]) -> Result<SampleLabels, EncodeError> {
        let mut decoded = SampleLabels::default();
        for label in labels {
            let key = self.string(label.key)?;
            let text = self.string(label.str)?;
            match key {
                THREAD_ID => decoded.thread_id = label_u32(THREAD_ID, label.num)?,
                PROCESS_ID => decoded.process_id = label_u32(PROCESS_ID, label.num)?,
                THREAD_NAME => decoded.thread_name = text.to_string(),
                // A state this version does not know is kept, as the rare kind.
                STATE => decoded.state = ThreadState::from_code(text).unwrap_or(ThreadState::Other),
                _ => {
                    let value = if label.str == 0 && label.num != 0 {
                        label.num.to_string()
                    } else {
                        text.to_string()
                    };
                    match Key::from_name(key) {
                        Some(known) => decoded.extra.push((known, value)),
                        None => decoded.foreign.push((key.to_string(), value)),
                    }
                }
            }
        }
        Ok(decoded)
    }
}

/// Index 0 is `""` even in a file whose string table is empty.
fn string_at(message: &Profile, index: i64) -> Result<&str, EncodeError> {
    if index == 0 {
        return Ok("");
    }
    usize::try_from(index)
        .ok()
        .and_then(|position| message.string_table.get(position))
        .map(String::as_str)
        .ok_or(EncodeError::UnknownString { index })
}

/// The kind of profile `message` is, from its sample types.
fn profile_kind(message: &Profile) -> Result<ProfileKind, EncodeError> {
    let mut found = Vec::with_capacity(message.sample_type.len());
    for value_type in &message.sample_type {
        let type_name = string_at(message, value_type.r#type)?;
        let unit = string_at(message, value_type.unit)?;
        if let Some(kind) = ProfileKind::from_value_type(type_name, unit) {
            return Ok(kind);
        }
        found.push(format!("{type_name}/{unit}"));
    }
    let found = if found.is_empty() {
        "none".to_string()
    } else {
        found.join(", ")
    };
    Err(EncodeError::UnknownSampleTypes { found })
}

/// Where the `type_name/unit` values sit in each sample's `value`.
fn sample_type_position(
    message: &Profile,
    (type_name, unit): (&'static str, &'static str),
) -> Result<usize, EncodeError> {
    for (position, value_type) in message.sample_type.iter().enumerate() {
        if string_at(message, value_type.r#type)? == type_name
            && string_at(message, value_type.unit)? == unit
        {
            return Ok(position);
        }
    }
    Err(EncodeError::MissingSampleType { type_name, unit })
}

fn label_u32(field: &'static str, value: i64) -> Result<u32, EncodeError> {
    u32::try_from(value).map_err(|_| EncodeError::OutOfRange { field, value })
}

fn non_negative(field: &'static str, value: i64) -> Result<u64, EncodeError> {
    u64::try_from(value).map_err(|_| EncodeError::OutOfRange { field, value })
}

/// pprof values are signed; real counts and nanosecond totals never reach
/// `i64::MAX`, so clamping there only guards against nonsense input.
fn saturating_i64(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

fn unix_nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => saturating_i64(after.as_nanos()),
        Err(before) => -saturating_i64(before.duration().as_nanos()),
    }
}

fn from_unix_nanos(nanos: i64) -> Result<SystemTime, EncodeError> {
    let offset = Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    }
    .ok_or(EncodeError::OutOfRange {
        field: "time_nanos",
        value: nanos,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::profile::fixtures::{kernel, line, user};
    use crate::profile::Sample as ModelSample;

    const SHARED_ADDRESS: u64 = 0x5000;

    /// Two threads, one of them with an inlined frame, a truncated stack,
    /// and a kernel and a user frame at the same numeric address.
    fn sample_profile() -> model::Profile {
        let sleep_stack = vec![
            kernel(0xffff_ffff_8100_1000, "schedule"),
            kernel(0xffff_ffff_8100_2000, "do_nanosleep"),
            user(
                0x1234,
                0,
                vec![
                    line(
                        "std::thread::sleep",
                        Some("library/std/src/thread/mod.rs"),
                        Some(917),
                    ),
                    line("app::run", Some("src/main.rs"), Some(12)),
                ],
            ),
            user(0x1300, 0, vec![line("main", Some("src/main.rs"), Some(3))]),
        ];
        let read_stack = vec![
            kernel(SHARED_ADDRESS, "schedule"),
            user(SHARED_ADDRESS, 1, vec![line("read", None, None)]),
            Frame::marker_truncated(),
        ];
        model::Profile {
            kind: model::ProfileKind::OffCpu,
            start: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            duration: Duration::from_millis(15_250),
            samples: vec![
                ModelSample {
                    stack: sleep_stack.clone(),
                    value: 12_000_000_000,
                    count: 12,
                    labels: SampleLabels {
                        process_id: 100,
                        thread_id: 101,
                        thread_name: "worker".to_string(),
                        state: ThreadState::Sleeping,
                        extra: vec![
                            (Key::TraceId, "4bf92f3577b34da6".to_string()),
                            (Key::SpanId, "00f067aa0ba902b7".to_string()),
                        ],
                        foreign: Vec::new(),
                    },
                    timeline: Vec::new(),
                },
                ModelSample {
                    stack: sleep_stack,
                    value: 2_000_000,
                    count: 1,
                    labels: SampleLabels {
                        process_id: 100,
                        thread_id: 102,
                        thread_name: "worker".to_string(),
                        state: ThreadState::Runnable,
                        extra: Vec::new(),
                        foreign: Vec::new(),
                    },
                    timeline: Vec::new(),
                },
                ModelSample {
                    stack: read_stack,
                    value: 340_000_000,
                    count: 2,
                    labels: SampleLabels {
                        process_id: 100,
                        thread_id: 103,
                        thread_name: "reader".to_string(),
                        state: ThreadState::Disk,
                        extra: vec![(Key::Lock, "0xdead".to_string())],
                        foreign: Vec::new(),
                    },
                    timeline: Vec::new(),
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
            comments: vec![
                "dropped 3 events".to_string(),
                "freezeframe capture --pid 100".to_string(),
            ],
        }
    }

    /// Two large address-space changes: a 3.5 GB map rehash, the case this
    /// kind exists for, and two smaller mmaps in libc.
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
        let mmap_stack = vec![
            user(0x4800, 1, vec![line("mmap64", None, None)]),
            Frame::marker_truncated(),
        ];
        let labels = |thread_id| SampleLabels {
            process_id: 100,
            thread_id,
            thread_name: "worker".to_string(),
            state: ThreadState::Runnable,
            extra: Vec::new(),
            foreign: Vec::new(),
        };
        model::Profile {
            kind: ProfileKind::AddressSpace,
            samples: vec![
                ModelSample {
                    stack: rehash_stack,
                    value: 3_500_000_000,
                    count: 1,
                    labels: labels(101),
                    timeline: Vec::new(),
                },
                ModelSample {
                    stack: mmap_stack,
                    value: 192 << 20,
                    count: 2,
                    labels: labels(102),
                    timeline: Vec::new(),
                },
            ],
            ..sample_profile()
        }
    }

    fn string(message: &Profile, index: i64) -> &str {
        &message.string_table[index as usize]
    }

    fn location(message: &Profile, id: u64) -> &Location {
        message
            .location
            .iter()
            .find(|location| location.id == id)
            .unwrap()
    }

    fn function_name(message: &Profile, location: &Location) -> String {
        let line = location.line.last().unwrap();
        let function = message
            .function
            .iter()
            .find(|f| f.id == line.function_id)
            .unwrap();
        string(message, function.name).to_string()
    }

    #[test]
    fn round_trip_gives_back_the_model() {
        let profile = sample_profile();
        assert_eq!(decode(&encode(&profile)).unwrap(), profile);
    }

    #[test]
    fn an_address_space_profile_round_trips_too() {
        let profile = address_space_profile();
        assert_eq!(decode(&encode(&profile)).unwrap(), profile);
    }

    #[test]
    fn an_address_space_profile_is_typed_in_bytes_and_calls() {
        let message = to_message(&address_space_profile());
        let types: Vec<(&str, &str)> = message
            .sample_type
            .iter()
            .map(|t| (string(&message, t.r#type), string(&message, t.unit)))
            .collect();
        assert_eq!(types, [("calls", "count"), ("alloc_space", "bytes")]);
        assert_eq!(string(&message, message.default_sample_type), "alloc_space");
        let period_type = message.period_type.as_ref().unwrap();
        assert_eq!(
            (
                string(&message, period_type.r#type),
                string(&message, period_type.unit)
            ),
            ("address_space", "bytes")
        );
        assert_eq!(message.sample[0].value, [1, 3_500_000_000]);
    }

    #[test]
    fn the_kind_is_found_wherever_its_value_type_sits() {
        let profile = address_space_profile();
        let mut message = to_message(&profile);
        message.sample_type.reverse();
        for sample in &mut message.sample {
            sample.value.reverse();
        }
        assert_eq!(decode(&message.encode_to_vec()).unwrap(), profile);
    }

    #[test]
    fn plain_protobuf_decodes_too() {
        let profile = sample_profile();
        assert_eq!(
            decode(&to_message(&profile).encode_to_vec()).unwrap(),
            profile
        );
    }

    #[test]
    fn output_is_gzip() {
        assert!(encode(&sample_profile()).starts_with(&GZIP_MAGIC));
    }

    #[test]
    fn string_table_starts_empty_and_has_no_duplicates() {
        let message = to_message(&sample_profile());
        assert_eq!(message.string_table[0], "");
        let distinct: HashSet<&String> = message.string_table.iter().collect();
        assert_eq!(distinct.len(), message.string_table.len());
    }

    #[test]
    fn functions_and_locations_are_deduplicated() {
        let message = to_message(&sample_profile());
        let functions: HashSet<(i64, i64)> = message
            .function
            .iter()
            .map(|f| (f.name, f.filename))
            .collect();
        assert_eq!(functions.len(), message.function.len());
        // schedule (once, though at two addresses), do_nanosleep, sleep,
        // run, main, read, [truncated].
        assert_eq!(message.function.len(), 7);
        // Four frames of the shared sleep stack, three of the read stack.
        assert_eq!(message.location.len(), 7);
        assert_eq!(message.sample[0].location_id, message.sample[1].location_id);
        let ids: Vec<u64> = message
            .location
            .iter()
            .map(|location| location.id)
            .collect();
        assert_eq!(ids, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn stacks_are_leaf_first_and_inline_chains_innermost_first() {
        let message = to_message(&sample_profile());
        let stack = &message.sample[0].location_id;
        assert_eq!(
            function_name(&message, location(&message, stack[0])),
            "schedule"
        );
        assert_eq!(
            function_name(&message, location(&message, stack[3])),
            "main"
        );
        let inlined = location(&message, stack[2]);
        assert_eq!(inlined.line.len(), 2);
        assert_eq!(inlined.line[0].line, 917);
        assert_eq!(function_name(&message, inlined), "app::run");
    }

    #[test]
    fn kernel_and_user_frames_at_one_address_stay_apart() {
        let message = to_message(&sample_profile());
        let stack = &message.sample[2].location_id;
        let (kernel, user) = (location(&message, stack[0]), location(&message, stack[1]));
        assert_eq!(
            (kernel.address, user.address),
            (SHARED_ADDRESS, SHARED_ADDRESS)
        );
        assert_ne!(kernel.id, user.id);
        assert_ne!(kernel.mapping_id, user.mapping_id);
        let kernel_mapping = &message.mapping[kernel.mapping_id as usize - 1];
        assert_eq!(string(&message, kernel_mapping.filename), KERNEL_MAPPING);
        assert!(kernel_mapping.memory_start <= SHARED_ADDRESS);
        assert!(kernel_mapping.memory_limit > 0xffff_ffff_8100_2000);
        let truncated = location(&message, stack[2]);
        assert_eq!(truncated.mapping_id, 0);
        assert_eq!(function_name(&message, truncated), TRUNCATED_FRAME);
    }

    #[test]
    fn mappings_carry_build_ids_and_resolution() {
        let message = to_message(&sample_profile());
        let app = &message.mapping[0];
        assert_eq!(
            (app.id, string(&message, app.filename)),
            (1, "/usr/bin/app")
        );
        assert_eq!(string(&message, app.build_id), "abcdef0123456789");
        assert!(app.has_functions && app.has_filenames && app.has_line_numbers);
        assert!(app.has_inline_frames);
        let libc = &message.mapping[1];
        assert_eq!(libc.build_id, 0);
        assert!(libc.has_functions && !libc.has_filenames && !libc.has_inline_frames);
    }

    #[test]
    fn header_fields_are_set() {
        let message = to_message(&sample_profile());
        let types: Vec<(&str, &str)> = message
            .sample_type
            .iter()
            .map(|t| (string(&message, t.r#type), string(&message, t.unit)))
            .collect();
        assert_eq!(types, [("events", "count"), ("off_cpu", "nanoseconds")]);
        assert_eq!(string(&message, message.default_sample_type), "off_cpu");
        assert_eq!(message.sample[0].value, [12, 12_000_000_000]);
        assert_eq!(
            (message.period_type.as_ref(), message.period),
            (None, 0),
            "off_cpu:off_cpu:nanoseconds::, as over OTLP"
        );
        assert_eq!(message.time_nanos, 1_700_000_000_123_456_789);
        assert_eq!(message.duration_nanos, 15_250_000_000);
        let comments: Vec<&str> = message
            .comment
            .iter()
            .map(|&i| string(&message, i))
            .collect();
        assert_eq!(
            comments,
            ["dropped 3 events", "freezeframe capture --pid 100"]
        );
    }

    #[test]
    fn labels_are_present() {
        let message = to_message(&sample_profile());
        let labels: Vec<(&str, String)> = message.sample[0]
            .label
            .iter()
            .map(|label| {
                let value = if label.str != 0 {
                    string(&message, label.str).to_string()
                } else {
                    label.num.to_string()
                };
                (string(&message, label.key), value)
            })
            .collect();
        let expected = [
            ("thread_id", "101"),
            ("process_id", "100"),
            ("thread_name", "worker"),
            ("state", "S"),
            ("trace_id", "4bf92f3577b34da6"),
            ("span_id", "00f067aa0ba902b7"),
        ];
        assert_eq!(
            labels,
            expected.map(|(key, value)| (key, value.to_string()))
        );
    }

    #[test]
    fn a_pyroscope_pprof_has_string_series_labels_and_detail_frames() {
        let mut profile = sample_profile();
        profile.samples[2].labels.set(Key::LockHolderTid, "77");
        profile.samples[0]
            .labels
            .set_span_link(crate::profile::SpanLink {
                trace_id: [0x4b; 16],
                span_id: [0x0f; 8],
            });
        let message = to_message_for(&profile, Target::Pyroscope);
        let labels = |index: usize| -> Vec<(&str, &str)> {
            message.sample[index]
                .label
                .iter()
                .map(|label| {
                    assert_ne!(label.str, 0, "Pyroscope drops numeric labels");
                    (string(&message, label.key), string(&message, label.str))
                })
                .collect()
        };
        assert_eq!(
            labels(0),
            [
                ("thread_name", "worker"),
                ("thread_state", "S"),
                ("span_id", "0f0f0f0f0f0f0f0f"),
                ("trace_id", "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b"),
            ]
        );
        assert_eq!(
            labels(2),
            [
                ("thread_name", "reader"),
                ("thread_state", "D"),
                ("lock_kind", "0xdead")
            ]
        );
        let leaf = message.sample[2].location_id[0];
        let location = &message.location[leaf as usize - 1];
        let function = &message.function[location.line[0].function_id as usize - 1];
        assert_eq!(
            (location.mapping_id, string(&message, function.name)),
            (0, "[waiting for 0xdead, held by tid 77]")
        );
        assert_eq!(
            message.sample[2].location_id.len(),
            profile.samples[2].stack.len() + 1
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let error = decode(b"\xff\xff\xff\xff not a profile").unwrap_err();
        assert!(matches!(error, EncodeError::Protobuf(_)), "{error:?}");
    }

    #[test]
    fn empty_input_lacks_sample_types() {
        let error = decode(b"").unwrap_err();
        assert!(
            matches!(&error, EncodeError::UnknownSampleTypes { found } if found == "none"),
            "{error:?}"
        );
    }

    /// Replaces one string of the table, as another producer might have
    /// written it.
    fn rename(message: &mut Profile, from: &str, to: &str) {
        let entry = message
            .string_table
            .iter_mut()
            .find(|text| *text == from)
            .unwrap();
        *entry = to.to_string();
    }

    #[test]
    fn a_profile_of_another_kind_is_an_error_naming_its_types() {
        let mut message = to_message(&sample_profile());
        rename(&mut message, "off_cpu", "cpu");
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(&error, EncodeError::UnknownSampleTypes { found }
                if found == "events/count, cpu/nanoseconds"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("off_cpu/nanoseconds or alloc_space/bytes"),
            "{text}"
        );
    }

    #[test]
    fn a_kind_without_its_count_type_is_an_error() {
        let mut message = to_message(&address_space_profile());
        rename(&mut message, "calls", "objects");
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::MissingSampleType {
                    type_name: "calls",
                    unit: "count"
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let bytes = encode(&sample_profile());
        let error = decode(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(error, EncodeError::Gzip(_)), "{error:?}");
    }

    #[test]
    fn truncated_protobuf_is_an_error() {
        let bytes = to_message(&sample_profile()).encode_to_vec();
        let error = decode(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(error, EncodeError::Protobuf(_)), "{error:?}");
    }

    #[test]
    fn gzip_bomb_is_refused() {
        let mut gzip = GzEncoder::new(Vec::new(), Compression::fast());
        gzip.write_all(&vec![0; 1 << 20]).unwrap();
        let bomb = gzip.finish().unwrap();
        let error = decode_limited(&bomb, 64 << 10).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::TooLarge {
                    limit_bytes: 65_536
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn dangling_references_are_errors() {
        let mut message = to_message(&sample_profile());
        message.sample[0].location_id[0] = 99;
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::UnknownId {
                    table: "location",
                    id: 99
                }
            ),
            "{error:?}"
        );

        let mut message = to_message(&sample_profile());
        message.function[0].name = 10_000;
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(error, EncodeError::UnknownString { index: 10_000 }),
            "{error:?}"
        );

        let mut message = to_message(&sample_profile());
        message.location[0].mapping_id = 42;
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::UnknownId {
                    table: "mapping",
                    id: 42
                }
            ),
            "{error:?}"
        );

        let mut message = to_message(&sample_profile());
        message.sample[0].value.pop();
        let error = decode(&message.encode_to_vec()).unwrap_err();
        assert!(
            matches!(
                error,
                EncodeError::ValueCount {
                    expected: 2,
                    found: 1
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn unsymbolized_locations_get_a_miss_name() {
        let mut message = to_message(&sample_profile());
        let leaf_of_read = message.sample[2].location_id[1];
        message.location[leaf_of_read as usize - 1].line.clear();
        let profile = decode(&message.encode_to_vec()).unwrap();
        assert_eq!(
            profile.samples[2].stack[1].function(),
            "[unknown] /usr/lib/libc.so.6+0x2000"
        );
    }
}
