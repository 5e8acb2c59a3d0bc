//! The few protobuf messages of W&B's `wandb_internal.proto` that sipt writes, encoded by
//! hand, and a minimal wire-format decoder for reading them back.
//!
//! Field numbers (checked against the descriptor in PyPI `wandb` 0.31.0):
//! - `Record`: num 1 (int64), history 2, summary 3, config 5, run 17, exit 18, header 21.
//! - `RunRecord`: run_id 1, entity 2, project 3, config 4 (ConfigRecord), display_name 8,
//!   tags 10 (repeated), host 13, start_time 17 (google.protobuf.Timestamp), resume 24.
//! - `HistoryRecord`: item 1 (repeated HistoryItem), step 2 (HistoryStep: num 1, int64).
//! - `SummaryRecord` / `ConfigRecord`: update 1 (repeated SummaryItem / ConfigItem).
//! - `HistoryItem`, `SummaryItem`, `ConfigItem`: key 1, nested_key 2 (repeated),
//!   value_json 16.
//! - `RunExitRecord`: exit_code 1 (int32), runtime 2 (int32 seconds).
//! - `Timestamp`: seconds 1 (int64), nanos 2 (int32).
//!
//! As in proto3, scalar fields holding their default value are left out.

use crate::Error;

pub(crate) mod field {
    pub const RECORD_NUM: u32 = 1;
    pub const RECORD_HISTORY: u32 = 2;
    pub const RECORD_SUMMARY: u32 = 3;
    pub const RECORD_CONFIG: u32 = 5;
    pub const RECORD_RUN: u32 = 17;
    pub const RECORD_EXIT: u32 = 18;
    pub const RECORD_HEADER: u32 = 21;

    pub const RUN_ID: u32 = 1;
    pub const RUN_ENTITY: u32 = 2;
    pub const RUN_PROJECT: u32 = 3;
    pub const RUN_CONFIG: u32 = 4;
    pub const RUN_DISPLAY_NAME: u32 = 8;
    pub const RUN_TAGS: u32 = 10;
    pub const RUN_HOST: u32 = 13;
    pub const RUN_START_TIME: u32 = 17;
    pub const RUN_RESUME: u32 = 24;

    /// `item` of HistoryRecord, `update` of SummaryRecord and ConfigRecord.
    pub const ITEMS: u32 = 1;
    pub const HISTORY_STEP: u32 = 2;
    pub const STEP_NUM: u32 = 1;

    pub const ITEM_KEY: u32 = 1;
    pub const ITEM_NESTED_KEY: u32 = 2;
    pub const ITEM_VALUE_JSON: u32 = 16;

    pub const EXIT_CODE: u32 = 1;
    pub const EXIT_RUNTIME: u32 = 2;

    pub const TIMESTAMP_SECONDS: u32 = 1;
    pub const TIMESTAMP_NANOS: u32 = 2;
}

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// A protobuf message being encoded.
#[derive(Default, Debug, Clone)]
pub(crate) struct Msg(Vec<u8>);

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Msg {
    pub(crate) fn new() -> Self {
        Msg(Vec::new())
    }

    fn tag(&mut self, field: u32, wire: u32) {
        put_varint(&mut self.0, ((field as u64) << 3) | wire as u64);
    }

    /// int64 / int32 field (negative values take 10 bytes, as protobuf specifies).
    pub(crate) fn int(&mut self, field: u32, v: i64) -> &mut Self {
        if v != 0 {
            self.tag(field, VARINT);
            put_varint(&mut self.0, v as u64);
        }
        self
    }

    pub(crate) fn bool(&mut self, field: u32, v: bool) -> &mut Self {
        if v {
            self.tag(field, VARINT);
            self.0.push(1);
        }
        self
    }

    /// String field; empty strings are left out (proto3 default).
    pub(crate) fn string(&mut self, field: u32, s: &str) -> &mut Self {
        if !s.is_empty() {
            self.bytes_always(field, s.as_bytes());
        }
        self
    }

    /// An element of a repeated string field: written even when empty.
    pub(crate) fn repeated_string(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes_always(field, s.as_bytes())
    }

    /// Embedded message field (written even when empty: presence matters for messages).
    pub(crate) fn message(&mut self, field: u32, m: &Msg) -> &mut Self {
        self.bytes_always(field, &m.0)
    }

    fn bytes_always(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.tag(field, LEN);
        put_varint(&mut self.0, b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A `key`/`value_json` item (HistoryItem, SummaryItem and ConfigItem share the shape).
pub(crate) fn item(key: &str, value_json: &str) -> Msg {
    let mut m = Msg::new();
    m.string(field::ITEM_KEY, key)
        .string(field::ITEM_VALUE_JSON, value_json);
    m
}

/// An item keyed by a path: `key` for a one-part path, `nested_key` otherwise.
pub(crate) fn item_path(path: &[String], value_json: &str) -> Msg {
    if let [key] = path {
        return item(key, value_json);
    }
    let mut m = Msg::new();
    for part in path {
        m.repeated_string(field::ITEM_NESTED_KEY, part);
    }
    m.string(field::ITEM_VALUE_JSON, value_json);
    m
}

/// A `google.protobuf.Timestamp`.
pub(crate) fn timestamp(seconds: i64, nanos: i32) -> Msg {
    let mut m = Msg::new();
    m.int(field::TIMESTAMP_SECONDS, seconds)
        .int(field::TIMESTAMP_NANOS, nanos as i64);
    m
}

/// A `Record` with `num` and one `record_type` field set to `body`.
pub(crate) fn record(num: i64, kind: u32, body: &Msg) -> Vec<u8> {
    let mut m = Msg::new();
    m.int(field::RECORD_NUM, num).message(kind, body);
    m.into_bytes()
}

/// One decoded field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Varint(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Result<&'a str, Error> {
        let bytes = self
            .as_bytes()
            .ok_or_else(|| Error::Format("expected a length-delimited field".into()))?;
        std::str::from_utf8(bytes).map_err(|_| Error::Format("string field is not UTF-8".into()))
    }
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Error> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| Error::Format("protobuf varint runs past the end".into()))?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err(Error::Format("protobuf varint overflows 64 bits".into()));
        }
        v |= ((b & 0x7F) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Error::Format("protobuf varint longer than 10 bytes".into()))
}

/// Decodes the top-level fields of one message, in order.
pub(crate) fn fields(buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>, Error> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = get_varint(buf, &mut pos)?;
        let field = (tag >> 3) as u32;
        if field == 0 {
            return Err(Error::Format("protobuf field number 0".into()));
        }
        let take = |pos: &mut usize, n: usize| -> Result<&[u8], Error> {
            let end = pos
                .checked_add(n)
                .filter(|&e| e <= buf.len())
                .ok_or_else(|| Error::Format("protobuf field runs past the end".into()))?;
            let s = &buf[*pos..end];
            *pos = end;
            Ok(s)
        };
        let value = match (tag & 7) as u32 {
            VARINT => Value::Varint(get_varint(buf, &mut pos)?),
            FIXED64 => Value::Fixed64(u64::from_le_bytes(take(&mut pos, 8)?.try_into().unwrap())),
            LEN => {
                let n = get_varint(buf, &mut pos)? as usize;
                Value::Bytes(take(&mut pos, n)?)
            }
            FIXED32 => Value::Fixed32(u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap())),
            w => return Err(Error::Format(format!("unsupported protobuf wire type {w}"))),
        };
        out.push((field, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_negative_ints_follow_the_protobuf_encoding() {
        let mut m = Msg::new();
        m.int(1, 150);
        assert_eq!(m.0, [0x08, 0x96, 0x01]);
        let mut m = Msg::new();
        m.int(18, -1);
        assert_eq!(m.0.len(), 2 + 10);
        assert_eq!(&m.0[..2], &[0x90, 0x01]);
        let f = fields(&m.0).unwrap();
        assert_eq!(f, vec![(18, Value::Varint(u64::MAX))]);
        assert_eq!(f[0].1.as_u64().unwrap() as i64, -1);
    }

    #[test]
    fn defaults_are_left_out_but_messages_are_kept() {
        let mut m = Msg::new();
        m.int(1, 0)
            .bool(2, false)
            .string(3, "")
            .message(4, &Msg::new());
        assert_eq!(m.0, [0x22, 0x00]);
    }

    #[test]
    fn nested_messages_decode_back() {
        let mut hist = Msg::new();
        hist.message(field::ITEMS, &item("loss", "0.5"));
        let mut step = Msg::new();
        step.int(field::STEP_NUM, 300);
        hist.message(field::HISTORY_STEP, &step);
        let rec = record(7, field::RECORD_HISTORY, &hist);

        let top = fields(&rec).unwrap();
        assert_eq!(top[0], (field::RECORD_NUM, Value::Varint(7)));
        assert_eq!(top[1].0, field::RECORD_HISTORY);
        let inner = fields(top[1].1.as_bytes().unwrap()).unwrap();
        let it = fields(inner[0].1.as_bytes().unwrap()).unwrap();
        assert_eq!(it[0].1.as_str().unwrap(), "loss");
        // value_json is field 16: a two-byte tag.
        assert_eq!(it[1].0, field::ITEM_VALUE_JSON);
        assert_eq!(it[1].1.as_str().unwrap(), "0.5");
        let st = fields(inner[1].1.as_bytes().unwrap()).unwrap();
        assert_eq!(st, vec![(field::STEP_NUM, Value::Varint(300))]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(fields(&[0x0A, 0x05, b'a']).is_err(), "length past the end");
        assert!(fields(&[0x08]).is_err(), "varint past the end");
        assert!(fields(&[0x0B]).is_err(), "wire type 3 (groups) unsupported");
        assert!(
            fields(&[0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_err()
        );
        assert_eq!(
            fields(&[0x0D, 1, 0, 0, 0]).unwrap(),
            vec![(1, Value::Fixed32(1))]
        );
    }
}
