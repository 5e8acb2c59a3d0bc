//! Learn the field names of a `Deserialize` struct without a value, so that validators can
//! suggest the nearest valid key ("did you mean ...?"). serde passes a struct's field list to
//! `deserialize_struct`; this deserializer records it and stops.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::cell::RefCell;

struct Recorder<'a> {
    fields: &'a RefCell<Vec<&'static str>>,
}

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for Recorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        self.fields.borrow_mut().extend_from_slice(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The field names of `T` if it deserializes as a struct (flattened fields are not listed).
pub fn field_names<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
    let fields = RefCell::new(Vec::new());
    let _ = T::deserialize(Recorder { fields: &fields });
    fields.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Example {
        threshold: f64,
        #[serde(rename = "word_lists")]
        lists: Vec<String>,
    }

    #[test]
    fn records_serde_names() {
        assert_eq!(field_names::<Example>(), vec!["threshold", "word_lists"]);
    }

    #[test]
    fn non_struct_has_no_fields() {
        assert!(field_names::<Vec<u32>>().is_empty());
    }
}
