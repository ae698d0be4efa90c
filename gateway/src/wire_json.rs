//! Proto3 JSON straight from an answer's protobuf wire bytes.
//!
//! Decoding every answer into a `DynamicMessage` and serializing that with
//! prost-reflect's serde support cost ~60k instructions per cache-hot
//! GetDeal (callgrind: 18k to decode, 40k to serialize, 23k of it three
//! Timestamps) — a third of the gateway's own work. Here the descriptors are
//! compiled once, at start-up, into a [`Plan`] per message type, and an
//! answer's bytes are read once against it.
//!
//! The JSON is what `flashmesh_platform::http1json::to_json` makes of the
//! decoded message — proto field names in field-number order, zero values of
//! fields without presence, 64-bit integers as strings, enums by name,
//! Timestamps in RFC 3339 — and the tests hold the two to that over every
//! message of the contracts. Shapes the plans leave out (map fields,
//! well-known types other than Timestamp, proto2 groups, extensions, a
//! singular message field sent in pieces that protobuf would merge) go
//! through that path instead, for the whole answer: rare, and still right.

use std::{collections::HashMap, fmt, io::Write as _, sync::Arc};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use prost::encoding::decode_varint;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value};
use serde::Serializer as _;

use crate::transcode::{TranscodeError, WRAPPER_TYPES};

/// Nesting deeper than this is refused, as prost's decoder refuses it.
const MAX_DEPTH: usize = 100;
/// `google.protobuf.Timestamp` range the JSON mapping allows:
/// 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Every message type of a descriptor pool, compiled for rendering.
struct Plans {
    plans: Vec<Plan>,
}

/// Renders the wire bytes of one message type as proto3 JSON. Cheap to
/// clone; one per route, sharing the pool's plans.
#[derive(Clone)]
pub struct WireJson {
    plans: Arc<Plans>,
    root: usize,
}

/// Builds [`WireJson`]s for the message types of one pool.
pub struct WireJsonBuilder {
    plans: Arc<Plans>,
    by_name: HashMap<String, usize>,
}

struct Plan {
    desc: MessageDescriptor,
    shape: Shape,
    /// In field-number order (the JSON order).
    fields: Vec<FieldPlan>,
    /// Field indexes of each oneof's members (synthetic oneofs included).
    oneofs: Vec<Vec<usize>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    Timestamp,
    /// Rendered through prost-reflect (other well-known types, extensions).
    Fallback,
}

struct FieldPlan {
    number: u32,
    /// `"name":`, ready to write.
    key: Box<[u8]>,
    kind: FieldKind,
    list: bool,
    presence: bool,
    oneof: Option<usize>,
    /// The JSON of an absent field without presence.
    absent: Box<[u8]>,
}

enum FieldKind {
    Double,
    Float,
    Int32,
    Sint32,
    Sfixed32,
    Uint32,
    Fixed32,
    Int64,
    Sint64,
    Sfixed64,
    Uint64,
    Fixed64,
    Bool,
    String,
    Bytes,
    Enum(EnumNames),
    Message(usize),
    /// Map fields: left to prost-reflect.
    Unsupported,
}

struct EnumNames {
    /// `google.protobuf.NullValue`, which is `null` in JSON.
    null: bool,
    /// Quoted names by number, sorted by number.
    names: Vec<(i32, Box<[u8]>)>,
}

/// Why rendering stopped.
enum Stop {
    /// A shape the plans leave to prost-reflect.
    Unsupported,
    Invalid(String),
}

/// One field as it sits on the wire: its wire type and value bytes (a
/// varint's bytes, 4 or 8 fixed bytes, or a length-delimited payload).
#[derive(Clone, Copy)]
struct Occurrence<'a> {
    wire: u8,
    value: &'a [u8],
    /// Position among the message's fields, for "last oneof member wins".
    order: u32,
}

impl WireJsonBuilder {
    pub fn new(pool: &DescriptorPool) -> Self {
        let descs: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<String, usize> = descs
            .iter()
            .enumerate()
            .map(|(index, desc)| (desc.full_name().to_owned(), index))
            .collect();
        let plans = descs
            .into_iter()
            .map(|desc| Plan::new(desc, &by_name))
            .collect();
        Self {
            plans: Arc::new(Plans { plans }),
            by_name,
        }
    }

    /// The renderer of `desc`'s messages, when the pool holds that type.
    pub fn for_message(&self, desc: &MessageDescriptor) -> Option<WireJson> {
        self.by_name.get(desc.full_name()).map(|&root| WireJson {
            plans: self.plans.clone(),
            root,
        })
    }
}

impl fmt::Debug for WireJsonBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireJsonBuilder")
            .field("messages", &self.by_name.len())
            .finish()
    }
}

impl fmt::Debug for WireJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WireJson")
            .field(&self.plans.plans[self.root].desc.full_name())
            .finish()
    }
}

impl WireJson {
    /// The message in `bytes` as proto3 JSON.
    pub fn to_json(&self, bytes: &[u8]) -> Result<Vec<u8>, TranscodeError> {
        let mut out = Vec::with_capacity(bytes.len() * 2 + 64);
        match self.plans.write_message(&mut out, self.root, bytes, 0) {
            Ok(()) => Ok(out),
            Err(Stop::Invalid(reason)) => Err(TranscodeError::Serialize(reason)),
            Err(Stop::Unsupported) => {
                let desc = self.plans.plans[self.root].desc.clone();
                let message = DynamicMessage::decode(desc, bytes)
                    .map_err(|e| TranscodeError::Serialize(e.to_string()))?;
                flashmesh_platform::http1json::to_json(&message)
                    .map_err(|e| TranscodeError::Serialize(e.to_string()))
            }
        }
    }
}

impl Plan {
    fn new(desc: MessageDescriptor, by_name: &HashMap<String, usize>) -> Self {
        let shape = match desc.full_name() {
            "google.protobuf.Timestamp" => Shape::Timestamp,
            name if is_json_special(name) => Shape::Fallback,
            _ if desc.extension_ranges().next().is_some() => Shape::Fallback,
            _ => Shape::Plain,
        };
        let oneof_names: Vec<String> = desc.oneofs().map(|o| o.full_name().to_owned()).collect();
        let mut fields: Vec<FieldPlan> = desc
            .fields()
            .map(|field| {
                let kind = match field.kind() {
                    Kind::Double => FieldKind::Double,
                    Kind::Float => FieldKind::Float,
                    Kind::Int32 => FieldKind::Int32,
                    Kind::Sint32 => FieldKind::Sint32,
                    Kind::Sfixed32 => FieldKind::Sfixed32,
                    Kind::Uint32 => FieldKind::Uint32,
                    Kind::Fixed32 => FieldKind::Fixed32,
                    Kind::Int64 => FieldKind::Int64,
                    Kind::Sint64 => FieldKind::Sint64,
                    Kind::Sfixed64 => FieldKind::Sfixed64,
                    Kind::Uint64 => FieldKind::Uint64,
                    Kind::Fixed64 => FieldKind::Fixed64,
                    Kind::Bool => FieldKind::Bool,
                    Kind::String => FieldKind::String,
                    Kind::Bytes => FieldKind::Bytes,
                    Kind::Enum(e) => {
                        let mut names: Vec<(i32, Box<[u8]>)> = e
                            .values()
                            .map(|v| (v.number(), json_string(v.name())))
                            .collect();
                        // Aliases: the first name of a number wins, as in
                        // prost-reflect's lookup.
                        names.sort_by_key(|(number, _)| *number);
                        names.dedup_by_key(|(number, _)| *number);
                        FieldKind::Enum(EnumNames {
                            null: e.full_name() == "google.protobuf.NullValue",
                            names,
                        })
                    }
                    Kind::Message(_) if field.is_map() => FieldKind::Unsupported,
                    Kind::Message(m) => by_name
                        .get(m.full_name())
                        .map_or(FieldKind::Unsupported, |&index| FieldKind::Message(index)),
                };
                let mut key = json_string(field.name()).into_vec();
                key.push(b':');
                let absent = if field.is_map() {
                    b"{}".to_vec()
                } else if field.is_list() {
                    b"[]".to_vec()
                } else {
                    let mut out = Vec::new();
                    write_value(&mut out, &kind, &field.default_value());
                    out
                };
                FieldPlan {
                    number: field.number(),
                    key: key.into_boxed_slice(),
                    list: field.is_list(),
                    presence: field.supports_presence(),
                    oneof: field
                        .containing_oneof()
                        .and_then(|o| oneof_names.iter().position(|n| n == o.full_name())),
                    kind,
                    absent: absent.into_boxed_slice(),
                }
            })
            .collect();
        fields.sort_by_key(|f| f.number);
        let mut oneofs = vec![Vec::new(); oneof_names.len()];
        for (index, field) in fields.iter().enumerate() {
            if let Some(oneof) = field.oneof {
                oneofs[oneof].push(index);
            }
        }
        Self {
            desc,
            shape,
            fields,
            oneofs,
        }
    }
}

/// Well-known types whose JSON form is not an object of their fields.
fn is_json_special(full_name: &str) -> bool {
    WRAPPER_TYPES.contains(&full_name)
        || matches!(
            full_name,
            "google.protobuf.Any"
                | "google.protobuf.Duration"
                | "google.protobuf.Struct"
                | "google.protobuf.Value"
                | "google.protobuf.ListValue"
                | "google.protobuf.FieldMask"
                | "google.protobuf.Empty"
        )
}

// Writing JSON to a `Vec` cannot fail: the results of serde_json's
// serializer calls below are ignored for that reason.

fn json_string(s: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(s.len() + 2);
    let _ = json(&mut out).serialize_str(s);
    out.into_boxed_slice()
}

/// A default value (what an absent field without presence shows).
fn write_value(out: &mut Vec<u8>, kind: &FieldKind, value: &Value) {
    match (kind, value) {
        (_, Value::Bool(v)) => drop(json(out).serialize_bool(*v)),
        (_, Value::I32(v)) => drop(json(out).serialize_i32(*v)),
        (_, Value::U32(v)) => drop(json(out).serialize_u32(*v)),
        (_, Value::I64(v)) => drop(json(out).collect_str(v)),
        (_, Value::U64(v)) => drop(json(out).collect_str(v)),
        (_, Value::F32(v)) => write_f32(out, *v),
        (_, Value::F64(v)) => write_f64(out, *v),
        (_, Value::String(v)) => drop(json(out).serialize_str(v)),
        (_, Value::Bytes(v)) => write_bytes(out, v),
        (FieldKind::Enum(names), Value::EnumNumber(number)) => names.write(out, *number),
        _ => out.extend_from_slice(b"null"),
    }
}

fn write_f32(out: &mut Vec<u8>, v: f32) {
    if v.is_finite() {
        let _ = json(out).serialize_f32(v);
    } else {
        write_non_finite(out, f64::from(v));
    }
}

fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = json(out).serialize_f64(v);
    } else {
        write_non_finite(out, v);
    }
}

/// Standard base64 with padding, quoted.
fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(
        start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
        0,
    );
    let written = BASE64.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
}

fn write_non_finite(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(if v.is_nan() {
        b"\"NaN\""
    } else if v > 0.0 {
        b"\"Infinity\""
    } else {
        b"\"-Infinity\""
    });
}

impl EnumNames {
    fn write(&self, out: &mut Vec<u8>, number: i32) {
        if self.null {
            out.extend_from_slice(b"null");
            return;
        }
        match self.names.binary_search_by_key(&number, |(n, _)| *n) {
            Ok(index) => out.extend_from_slice(&self.names[index].1),
            Err(_) => drop(json(out).serialize_i32(number)),
        }
    }
}

/// The next field of `rest`: its number and occurrence.
fn next_field<'a>(rest: &mut &'a [u8], order: u32) -> Result<(u32, Occurrence<'a>), Stop> {
    let key = varint(rest)?;
    let number = u32::try_from(key >> 3).map_err(|_| invalid("field number out of range"))?;
    if number == 0 {
        return Err(invalid("field number 0"));
    }
    let wire = (key & 7) as u8;
    let value = take_value(rest, wire)?;
    Ok((number, Occurrence { wire, value, order }))
}

/// The value of wire type `wire` at the front of `rest`: a varint's bytes,
/// 4 or 8 fixed bytes, or a length-delimited payload.
fn take_value<'a>(rest: &mut &'a [u8], wire: u8) -> Result<&'a [u8], Stop> {
    let len = match wire {
        VARINT => {
            let start = *rest;
            varint(rest)?;
            return Ok(&start[..start.len() - rest.len()]);
        }
        FIXED64 => 8,
        FIXED32 => 4,
        LEN => usize::try_from(varint(rest)?).map_err(|_| invalid("length out of range"))?,
        3 | 4 => return Err(Stop::Unsupported),
        _ => return Err(invalid("unknown wire type")),
    };
    if rest.len() < len {
        return Err(invalid("truncated field"));
    }
    let (value, tail) = rest.split_at(len);
    *rest = tail;
    Ok(value)
}

fn varint(rest: &mut &[u8]) -> Result<u64, Stop> {
    decode_varint(rest).map_err(|e| Stop::Invalid(e.to_string()))
}

fn invalid(reason: &str) -> Stop {
    Stop::Invalid(format!("malformed answer: {reason}"))
}

impl FieldKind {
    /// The wire type a single value of this kind travels in.
    fn wire(&self) -> u8 {
        match self {
            Self::Double | Self::Fixed64 | Self::Sfixed64 => FIXED64,
            Self::Float | Self::Fixed32 | Self::Sfixed32 => FIXED32,
            Self::String | Self::Bytes | Self::Message(_) | Self::Unsupported => LEN,
            _ => VARINT,
        }
    }

    /// Whether a list of this kind may come packed (numbers, bools, enums).
    fn packable(&self) -> bool {
        self.wire() != LEN
    }
}

impl Plans {
    fn write_message(
        &self,
        out: &mut Vec<u8>,
        index: usize,
        bytes: &[u8],
        depth: usize,
    ) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(invalid("nested too deeply"));
        }
        let plan = &self.plans[index];
        match plan.shape {
            Shape::Plain => {}
            Shape::Timestamp => return write_timestamp(out, bytes),
            Shape::Fallback => return Err(Stop::Unsupported),
        }

        // Pass 1: the last occurrence of each known field (unknown fields
        // are skipped, as prost-reflect leaves them out of JSON).
        let mut last: Vec<Option<Occurrence<'_>>> = vec![None; plan.fields.len()];
        let mut rest = bytes;
        let mut order = 0;
        while !rest.is_empty() {
            let (number, occurrence) = next_field(&mut rest, order)?;
            order += 1;
            let Ok(at) = plan.fields.binary_search_by_key(&number, |f| f.number) else {
                continue;
            };
            let field = &plan.fields[at];
            let expected = field.kind.wire();
            let packed = field.list && field.kind.packable() && occurrence.wire == LEN;
            if occurrence.wire != expected && !packed {
                return Err(invalid("wire type does not match the field"));
            }
            let merged = matches!(field.kind, FieldKind::Message(_)) && !field.list;
            if matches!(field.kind, FieldKind::Unsupported) || (merged && last[at].is_some()) {
                return Err(Stop::Unsupported);
            }
            last[at] = Some(occurrence);
        }

        // Pass 2: every field in number order.
        out.push(b'{');
        let mut first = true;
        for (at, field) in plan.fields.iter().enumerate() {
            let occurrence = last[at];
            if occurrence.is_none() && field.presence {
                continue;
            }
            if let (Some(seen), Some(oneof)) = (occurrence, field.oneof) {
                let later = plan.oneofs[oneof]
                    .iter()
                    .any(|&other| last[other].is_some_and(|o| o.order > seen.order));
                if later {
                    continue;
                }
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&field.key);
            match occurrence {
                None => out.extend_from_slice(&field.absent),
                Some(_) if field.list => self.write_list(out, field, bytes, depth)?,
                Some(occurrence) => self.write_scalar(out, &field.kind, occurrence.value, depth)?,
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// Every occurrence of a repeated field, packed or not, in wire order.
    fn write_list(
        &self,
        out: &mut Vec<u8>,
        field: &FieldPlan,
        bytes: &[u8],
        depth: usize,
    ) -> Result<(), Stop> {
        out.push(b'[');
        let mut first = true;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (number, occurrence) = next_field(&mut rest, 0)?;
            if number != field.number {
                continue;
            }
            if occurrence.wire == LEN && field.kind.packable() {
                let mut packed = occurrence.value;
                while !packed.is_empty() {
                    let value = take_value(&mut packed, field.kind.wire())?;
                    push_separator(out, &mut first);
                    self.write_scalar(out, &field.kind, value, depth)?;
                }
            } else {
                push_separator(out, &mut first);
                self.write_scalar(out, &field.kind, occurrence.value, depth)?;
            }
        }
        out.push(b']');
        Ok(())
    }

    /// One value of `kind` from its wire bytes (validated by the caller).
    fn write_scalar(
        &self,
        out: &mut Vec<u8>,
        kind: &FieldKind,
        value: &[u8],
        depth: usize,
    ) -> Result<(), Stop> {
        // Truncating casts below are protobuf's own rules for narrowing a
        // varint to the field's type.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        match kind {
            FieldKind::Int32 => drop(json(out).serialize_i32(read_varint(value)? as i32)),
            FieldKind::Sint32 => drop(json(out).serialize_i32(zigzag(read_varint(value)?) as i32)),
            FieldKind::Sfixed32 => drop(json(out).serialize_i32(i32::from_le_bytes(fixed(value)?))),
            FieldKind::Uint32 => drop(json(out).serialize_u32(read_varint(value)? as u32)),
            FieldKind::Fixed32 => drop(json(out).serialize_u32(u32::from_le_bytes(fixed(value)?))),
            FieldKind::Int64 => drop(json(out).collect_str(&(read_varint(value)? as i64))),
            FieldKind::Sint64 => drop(json(out).collect_str(&zigzag(read_varint(value)?))),
            FieldKind::Sfixed64 => drop(json(out).collect_str(&i64::from_le_bytes(fixed(value)?))),
            FieldKind::Uint64 => drop(json(out).collect_str(&read_varint(value)?)),
            FieldKind::Fixed64 => drop(json(out).collect_str(&u64::from_le_bytes(fixed(value)?))),
            FieldKind::Bool => drop(json(out).serialize_bool(read_varint(value)? != 0)),
            FieldKind::String => {
                let s = std::str::from_utf8(value).map_err(|_| invalid("a string is not UTF-8"))?;
                drop(json(out).serialize_str(s));
            }
            FieldKind::Bytes => write_bytes(out, value),
            FieldKind::Float => write_f32(out, f32::from_le_bytes(fixed(value)?)),
            FieldKind::Double => write_f64(out, f64::from_le_bytes(fixed(value)?)),
            FieldKind::Enum(names) => names.write(out, read_varint(value)? as i32),
            FieldKind::Message(index) => self.write_message(out, *index, value, depth + 1)?,
            FieldKind::Unsupported => return Err(Stop::Unsupported),
        }
        Ok(())
    }
}

fn push_separator(out: &mut Vec<u8>, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

fn read_varint(mut value: &[u8]) -> Result<u64, Stop> {
    varint(&mut value)
}

#[allow(clippy::cast_possible_wrap)]
fn zigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn fixed<const N: usize>(value: &[u8]) -> Result<[u8; N], Stop> {
    value
        .try_into()
        .map_err(|_| invalid("fixed-width value of the wrong size"))
}

/// A Timestamp as RFC 3339 (what prost-types' `Display` writes: fractional
/// seconds as 0, 3, 6 or 9 digits), after prost-reflect's range check.
fn write_timestamp(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), Stop> {
    let mut timestamp = prost_types::Timestamp::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (number, occurrence) = next_field(&mut rest, 0)?;
        if number > 2 {
            continue;
        }
        if occurrence.wire != VARINT {
            return Err(invalid("wire type does not match the field"));
        }
        let value = read_varint(occurrence.value)?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        if number == 1 {
            timestamp.seconds = value as i64;
        } else {
            timestamp.nanos = value as i32;
        }
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds) {
        return Err(Stop::Invalid("timestamp out of range".to_owned()));
    }
    match u32::try_from(timestamp.nanos) {
        Ok(nanos) if nanos < 1_000_000_000 => write_rfc3339(out, timestamp.seconds, nanos),
        // Nanos outside a second: prost-types normalizes them first.
        _ => drop(write!(out, "\"{timestamp}\"")),
    }
    Ok(())
}

/// `"YYYY-MM-DDTHH:MM:SS[.fff[fff[fff]]]Z"` for a time within the JSON
/// range (years 1 to 9999). `fmt` costs ~3k instructions per Timestamp, a
/// sixth of a whole answer; this is a few hundred.
fn write_rfc3339(out: &mut Vec<u8>, seconds: i64, nanos: u32) {
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let second_of_day = u32::try_from(second_of_day).unwrap_or(0);
    out.push(b'"');
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, month, 2);
    out.push(b'-');
    push_digits(out, day, 2);
    out.push(b'T');
    push_digits(out, second_of_day / 3600, 2);
    out.push(b':');
    push_digits(out, second_of_day / 60 % 60, 2);
    out.push(b':');
    push_digits(out, second_of_day % 60, 2);
    if nanos != 0 {
        out.push(b'.');
        if nanos.is_multiple_of(1_000_000) {
            push_digits(out, nanos / 1_000_000, 3);
        } else if nanos.is_multiple_of(1_000) {
            push_digits(out, nanos / 1_000, 6);
        } else {
            push_digits(out, nanos, 9);
        }
    }
    out.extend_from_slice(b"Z\"");
}

/// Year, month, day of a day count since 1970-01-01 in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`), for years 1 to
/// 9999.
fn civil_from_days(days: i64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let narrow = |v: i64| u32::try_from(v).unwrap_or(0);
    (narrow(year), narrow(month), narrow(day))
}

/// `value` in exactly `width` decimal digits (zero-padded).
fn push_digits(out: &mut Vec<u8>, mut value: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        // A digit: always below 10.
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// A JSON writer appending to `out`.
fn json(out: &mut Vec<u8>) -> serde_json::Serializer<&mut Vec<u8>> {
    serde_json::Serializer::new(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost::Message as _;
    use prost_reflect::{FieldDescriptor, MapKey};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(flashmesh_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    /// What prost-reflect makes of the same bytes: the reference.
    fn reference(desc: &MessageDescriptor, bytes: &[u8]) -> Option<String> {
        let message = DynamicMessage::decode(desc.clone(), bytes).ok()?;
        let json = flashmesh_platform::http1json::to_json(&message).ok()?;
        Some(String::from_utf8(json).unwrap())
    }

    fn render(builder: &WireJsonBuilder, desc: &MessageDescriptor, bytes: &[u8]) -> Option<String> {
        let json = builder.for_message(desc).unwrap().to_json(bytes).ok()?;
        Some(String::from_utf8(json).unwrap())
    }

    const STRINGS: [&str; 6] = [
        "",
        "d1",
        "quote \" and \\ back",
        "tab\tnew\nline\u{1}",
        "ünï €",
        "🦀",
    ];

    fn random_value(kind: &Kind, rng: &mut StdRng, depth: usize) -> Value {
        let pick = |rng: &mut StdRng, edges: &[i64]| -> i64 {
            if rng.random_bool(0.5) {
                edges[rng.random_range(0..edges.len())]
            } else {
                rng.random::<i64>() >> rng.random_range(0..63)
            }
        };
        match kind {
            Kind::Double => Value::F64(
                *[
                    0.0,
                    -0.0,
                    1.5,
                    -2.25e300,
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    0.1,
                ]
                .get(rng.random_range(0..8))
                .unwrap(),
            ),
            Kind::Float => Value::F32(
                *[
                    0.0,
                    1.5,
                    -3.4e38,
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    0.1,
                ]
                .get(rng.random_range(0..7))
                .unwrap(),
            ),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                Value::I32(pick(rng, &[0, -1, 1, i32::MIN.into(), i32::MAX.into()]) as i32)
            }
            Kind::Uint32 | Kind::Fixed32 => Value::U32(pick(rng, &[0, 1, u32::MAX.into()]) as u32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                Value::I64(pick(rng, &[0, -1, i64::MIN, i64::MAX, 12_900]))
            }
            Kind::Uint64 | Kind::Fixed64 => Value::U64(pick(rng, &[0, 1, -1]) as u64),
            Kind::Bool => Value::Bool(rng.random_bool(0.5)),
            Kind::String => Value::String(STRINGS[rng.random_range(0..STRINGS.len())].to_owned()),
            Kind::Bytes => {
                let len = rng.random_range(0..7);
                Value::Bytes(
                    (0..len)
                        .map(|_| rng.random::<u8>())
                        .collect::<Vec<_>>()
                        .into(),
                )
            }
            Kind::Enum(e) => {
                let values: Vec<i32> = e.values().map(|v| v.number()).collect();
                if rng.random_bool(0.9) {
                    Value::EnumNumber(values[rng.random_range(0..values.len())])
                } else {
                    Value::EnumNumber(rng.random_range(1000..2000))
                }
            }
            Kind::Message(m) => Value::Message(random_message(m, rng, depth + 1)),
        }
    }

    fn random_key(field: &FieldDescriptor, rng: &mut StdRng) -> MapKey {
        match random_value(&field.kind(), rng, usize::MAX) {
            Value::Bool(v) => MapKey::Bool(v),
            Value::I32(v) => MapKey::I32(v),
            Value::I64(v) => MapKey::I64(v),
            Value::U32(v) => MapKey::U32(v),
            Value::U64(v) => MapKey::U64(v),
            Value::String(v) => MapKey::String(v),
            other => panic!("not a map key: {other:?}"),
        }
    }

    fn random_message(desc: &MessageDescriptor, rng: &mut StdRng, depth: usize) -> DynamicMessage {
        let mut message = DynamicMessage::new(desc.clone());
        if desc.full_name() == "google.protobuf.Timestamp" {
            let seconds = rng.random_range(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS);
            let nanos =
                [0, 123_000_000, 123_456_000, 123_456_789, 999_999_999][rng.random_range(0..5)];
            message.set_field_by_name("seconds", Value::I64(seconds));
            message.set_field_by_name("nanos", Value::I32(nanos));
            return message;
        }
        for field in desc.fields() {
            let nested = matches!(field.kind(), Kind::Message(_));
            if rng.random_bool(0.3) || (nested && depth >= 3) {
                continue;
            }
            let value = if field.is_map() {
                let Kind::Message(entry) = field.kind() else {
                    unreachable!()
                };
                let (key, value) = (entry.map_entry_key_field(), entry.map_entry_value_field());
                Value::Map(
                    (0..rng.random_range(0..3))
                        .map(|_| {
                            (
                                random_key(&key, rng),
                                random_value(&value.kind(), rng, depth),
                            )
                        })
                        .collect::<HashMap<_, _>>(),
                )
            } else if field.is_list() {
                Value::List(
                    (0..rng.random_range(0..4))
                        .map(|_| random_value(&field.kind(), rng, depth))
                        .collect(),
                )
            } else {
                random_value(&field.kind(), rng, depth)
            };
            message.set_field(&field, value);
        }
        message
    }

    /// Whether the plans render `desc` themselves (no map fields, no
    /// well-known types other than Timestamp, at any depth).
    fn planned(desc: &MessageDescriptor, depth: usize) -> bool {
        depth < 5
            && !is_json_special(desc.full_name())
            && desc.fields().all(|f| match f.kind() {
                Kind::Message(m) => !f.is_map() && planned(&m, depth + 1),
                _ => true,
            })
    }

    #[test]
    fn same_json_as_prost_reflect_for_every_message_of_the_pool() {
        let pool = pool();
        let builder = WireJsonBuilder::new(&pool);
        let mut rng = StdRng::seed_from_u64(7);
        let (mut compared, mut fast_path) = (0, 0);
        for desc in pool.all_messages() {
            for _ in 0..60 {
                let bytes = random_message(&desc, &mut rng, 0).encode_to_vec();
                let expected = reference(&desc, &bytes);
                let got = render(&builder, &desc, &bytes);
                if desc.package_name().starts_with("flashmesh.") && planned(&desc, 0) {
                    let root = builder.by_name[desc.full_name()];
                    let fast = builder
                        .plans
                        .write_message(&mut Vec::new(), root, &bytes, 0);
                    assert!(
                        !matches!(fast, Err(Stop::Unsupported)),
                        "{} fell back",
                        desc.full_name()
                    );
                    fast_path += 1;
                }
                if desc.fields().any(|f| f.is_map()) {
                    // Map entries come out in hash order from prost-reflect.
                    let parse = |s: Option<String>| {
                        s.map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap())
                    };
                    assert_eq!(parse(got), parse(expected), "{}", desc.full_name());
                } else {
                    assert_eq!(got, expected, "{} from {bytes:?}", desc.full_name());
                }
                compared += 1;
            }
        }
        assert!(compared > 1000, "only {compared} messages compared");
        assert!(fast_path > 1000, "only {fast_path} on the fast path");
    }

    /// Hand-made bytes no prost encoder writes, but the wire allows.
    #[test]
    fn wire_corner_cases_read_as_protobuf_reads_them() {
        let pool = pool();
        let builder = WireJsonBuilder::new(&pool);
        let deal = pool
            .get_message_by_name("flashmesh.catalog.v1.Deal")
            .unwrap();
        let field = |name: &str| deal.get_field_by_name(name).unwrap().number();
        let key = |name: &str, wire: u8| u8::try_from(field(name) << 3).unwrap() | wire;
        assert!(field("starts_at") < 16, "one-byte keys below");
        let id = key("id", LEN);
        let stock = key("stock", VARINT);
        let starts = key("starts_at", LEN);
        let cases: Vec<Vec<u8>> = vec![
            // A scalar twice: the last one wins.
            vec![stock, 5, stock, 7],
            // An unknown field in between is skipped.
            vec![id, 1, b'a', 0xF8, 0x7F, 3, stock, 1],
            // A message field in two pieces: protobuf merges them.
            vec![starts, 2, 0x08, 0x05, starts, 2, 0x10, 0x07],
            // An empty message field is present.
            vec![starts, 0],
        ];
        for bytes in cases {
            assert_eq!(
                render(&builder, &deal, &bytes),
                reference(&deal, &bytes),
                "{bytes:?}"
            );
            assert!(render(&builder, &deal, &bytes).is_some(), "{bytes:?}");
        }
        let broken: Vec<Vec<u8>> = vec![
            vec![id, 5, b'a'],          // truncated
            vec![id, 2, 0xC3, 0x28],    // not UTF-8
            vec![key("id", VARINT), 1], // wrong wire type
            vec![0x00],                 // field number 0
        ];
        for bytes in &broken[..3] {
            assert_eq!(render(&builder, &deal, bytes), None, "{bytes:?}");
            assert_eq!(reference(&deal, bytes), None, "{bytes:?}");
        }
        assert_eq!(render(&builder, &deal, &broken[3]), None);
        // Out of the JSON range (year 10000): refused, as prost-reflect does.
        let mut late = vec![starts];
        let seconds = prost_types::Timestamp {
            seconds: MAX_TIMESTAMP_SECONDS + 1,
            nanos: 0,
        };
        let inner = seconds.encode_to_vec();
        late.push(u8::try_from(inner.len()).unwrap());
        late.extend(inner);
        assert_eq!(render(&builder, &deal, &late), None);
        assert_eq!(reference(&deal, &late), None);
    }

    #[test]
    fn timestamps_read_as_prost_types_writes_them() {
        let mut rng = StdRng::seed_from_u64(11);
        let edges = [
            MIN_TIMESTAMP_SECONDS,
            MAX_TIMESTAMP_SECONDS,
            0,
            -1,
            951_782_400,
            68_256_000,
        ];
        for i in 0..20_000 {
            let seconds = if i < edges.len() {
                edges[i]
            } else {
                rng.random_range(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS)
            };
            let nanos = [
                0,
                5_000_000,
                120_000,
                7,
                rng.random_range(0..1_000_000_000),
                -1,
                1_500_000_000,
            ][rng.random_range(0..7)];
            let timestamp = prost_types::Timestamp { seconds, nanos };
            let mut out = Vec::new();
            write_timestamp(&mut out, &timestamp.encode_to_vec())
                .ok()
                .unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{timestamp}\""),
                "{timestamp:?}"
            );
        }
    }

    #[test]
    fn repeated_fields_read_packed_and_unpacked() {
        let pool = pool();
        let builder = WireJsonBuilder::new(&pool);
        let desc = pool.all_messages().find(|m| {
            m.package_name().starts_with("flashmesh.")
                && m.fields()
                    .any(|f| f.is_list() && matches!(f.kind(), Kind::Enum(_)))
        });
        let desc = desc.expect("a message with a repeated enum");
        let list = desc
            .fields()
            .find(|f| f.is_list() && matches!(f.kind(), Kind::Enum(_)))
            .unwrap();
        let n = u8::try_from(list.number()).unwrap();
        assert!(n < 16, "one-byte keys below");
        // Packed [1, 2], then one unpacked 3, then packed [0].
        let bytes = vec![
            n << 3 | LEN,
            2,
            1,
            2,
            n << 3 | VARINT,
            3,
            n << 3 | LEN,
            1,
            0,
        ];
        let got = builder.for_message(&desc).unwrap().to_json(&bytes);
        let got =
            String::from_utf8(got.unwrap_or_else(|e| panic!("{}: {e}", desc.full_name()))).unwrap();
        assert_eq!(Some(got.clone()), reference(&desc, &bytes));
        let json: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(json[list.name()].as_array().unwrap().len(), 4, "{got}");
    }

    #[test]
    fn deal_answer_reads_as_documented() {
        let pool = pool();
        let builder = WireJsonBuilder::new(&pool);
        let desc = pool
            .get_message_by_name("flashmesh.catalog.v1.GetDealResponse")
            .unwrap();
        let mut deal = DynamicMessage::new(
            pool.get_message_by_name("flashmesh.catalog.v1.Deal")
                .unwrap(),
        );
        deal.set_field_by_name("id", Value::String("d1".into()));
        deal.set_field_by_name("price_cents", Value::I64(12900));
        deal.set_field_by_name("state", Value::EnumNumber(3));
        let starts = DynamicMessage::deserialize(
            pool.get_message_by_name("google.protobuf.Timestamp")
                .unwrap(),
            &serde_json::json!("2025-11-28T09:00:00Z"),
        )
        .unwrap();
        deal.set_field_by_name("starts_at", Value::Message(starts));
        let mut response = DynamicMessage::new(desc.clone());
        response.set_field_by_name("deal", Value::Message(deal));

        let json = render(&builder, &desc, &response.encode_to_vec()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let deal = &json["deal"];
        assert_eq!(deal["id"], "d1");
        assert_eq!(deal["price_cents"], "12900");
        assert_eq!(deal["remaining_stock"], 0);
        assert_eq!(deal["per_user_limit"], 0);
        assert_eq!(deal["product_id"], "");
        assert_eq!(deal["state"], "DEAL_STATE_SOLD_OUT");
        assert_eq!(deal["starts_at"], "2025-11-28T09:00:00Z");
        // Unset message fields are omitted; names are the proto names.
        assert!(deal.get("ends_at").is_none());
        assert!(deal.get("remainingStock").is_none());

        let list = pool
            .get_message_by_name("flashmesh.catalog.v1.ListDealsResponse")
            .unwrap();
        assert_eq!(
            render(&builder, &list, &[]).unwrap(),
            r#"{"deals":[],"next_page_token":""}"#
        );
    }
}
