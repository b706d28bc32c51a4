//! The parse tree in a lean generic form, made through the tree's own
//! `serde::Serialize`: node and field names are the `&'static str`s serde
//! hands out (no key is allocated), and fields at their default (false, 0,
//! empty, absent) and source locations are left out. A million-node tree
//! (a 1 MiB `IN (…)` list) takes a fraction of what `serde_json::Value`
//! would, and the walk in `tree.rs` reads it the same way.
use serde::ser::{self, Serialize};

/// A node, a field value, or a list.
#[derive(Debug, Default)]
pub enum Lean {
    /// A struct's fields, or a node as `{TypeName: fields}`.
    Map(Vec<(&'static str, Lean)>),
    Seq(Vec<Lean>),
    Str(String),
    Int(i64),
    Bool(bool),
    #[default]
    Absent,
}

impl Lean {
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Lean {
        value.serialize(Maker).unwrap_or_default()
    }

    pub fn get(&self, key: &str) -> Option<&Lean> {
        match self {
            Lean::Map(fields) => fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Lean::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Lean::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Lean::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Lean]> {
        match self {
            Lean::Seq(items) => Some(items),
            _ => None,
        }
    }

    fn is_default(&self) -> bool {
        match self {
            Lean::Absent | Lean::Bool(false) | Lean::Int(0) => true,
            Lean::Str(s) => s.is_empty(),
            Lean::Seq(items) => items.is_empty(),
            Lean::Map(_) | Lean::Bool(true) | Lean::Int(_) => false,
        }
    }
}

#[derive(Debug)]
pub struct Unsupported;

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a parse tree value of an unsupported shape")
    }
}

impl std::error::Error for Unsupported {}

impl ser::Error for Unsupported {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Unsupported
    }
}

struct Maker;

type Done = Result<Lean, Unsupported>;

impl ser::Serializer for Maker {
    type Ok = Lean;
    type Error = Unsupported;
    type SerializeSeq = SeqMaker;
    type SerializeTuple = SeqMaker;
    type SerializeTupleStruct = SeqMaker;
    type SerializeTupleVariant = ser::Impossible<Lean, Unsupported>;
    type SerializeMap = ser::Impossible<Lean, Unsupported>;
    type SerializeStruct = StructMaker;
    type SerializeStructVariant = ser::Impossible<Lean, Unsupported>;

    fn serialize_bool(self, v: bool) -> Done {
        Ok(Lean::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Done {
        Ok(Lean::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Done {
        Ok(Lean::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Done {
        Ok(Lean::Int(v as i64))
    }
    fn serialize_f32(self, _: f32) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_f64(self, _: f64) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_char(self, v: char) -> Done {
        Ok(Lean::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Done {
        Ok(Lean::Str(v.to_owned()))
    }
    fn serialize_bytes(self, _: &[u8]) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_none(self) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Done {
        Ok(Lean::Absent)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Done {
        Ok(Lean::Str(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Done {
        value.serialize(self)
    }
    /// A node of the tree (`NodeEnum::RangeVar(..)`): `{RangeVar: fields}`.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Done {
        Ok(Lean::Map(vec![(variant, value.serialize(Maker)?)]))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqMaker, Unsupported> {
        Ok(SeqMaker(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqMaker, Unsupported> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqMaker, Unsupported> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Unsupported> {
        Err(Unsupported)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Unsupported> {
        Err(Unsupported)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<StructMaker, Unsupported> {
        Ok(StructMaker(Vec::new()))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Unsupported> {
        Err(Unsupported)
    }
}

pub struct SeqMaker(Vec<Lean>);

impl ser::SerializeSeq for SeqMaker {
    type Ok = Lean;
    type Error = Unsupported;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
        self.0.push(value.serialize(Maker)?);
        Ok(())
    }
    fn end(self) -> Done {
        Ok(Lean::Seq(self.0))
    }
}

impl ser::SerializeTuple for SeqMaker {
    type Ok = Lean;
    type Error = Unsupported;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Done {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqMaker {
    type Ok = Lean;
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Done {
        ser::SerializeSeq::end(self)
    }
}

pub struct StructMaker(Vec<(&'static str, Lean)>);

impl ser::SerializeStruct for StructMaker {
    type Ok = Lean;
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Unsupported> {
        // Source positions say nothing about what a statement does.
        if key == "location" || key.ends_with("_location") {
            return Ok(());
        }
        let value = value.serialize(Maker)?;
        if !value.is_default() {
            self.0.push((key, value));
        }
        Ok(())
    }
    fn end(self) -> Done {
        Ok(Lean::Map(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_reads_like_its_json() {
        let parsed = pg_query::parse("SELECT a FROM s.t WHERE b IN (1, 2)", 0).unwrap();
        let lean = Lean::of(&parsed.protobuf.stmts[0].stmt);
        let select = lean.get("node").and_then(|n| n.get("SelectStmt")).unwrap();
        let from = select.get("from_clause").and_then(Lean::as_array).unwrap();
        let range_var = from[0].get("node").and_then(|n| n.get("RangeVar")).unwrap();
        assert_eq!(
            range_var.get("schemaname").and_then(Lean::as_str),
            Some("s")
        );
        assert_eq!(range_var.get("relname").and_then(Lean::as_str), Some("t"));
        // Defaults and locations are left out.
        assert!(range_var.get("catalogname").is_none());
        assert!(range_var.get("location").is_none());
        assert!(select.get("into_clause").is_none());
    }
}
