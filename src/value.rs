//! The values that flow from an origin through the mapping into a destination.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One cell of a row: what origins produce and destinations receive.
///
/// Kept deliberately small: every connector converts its native types to and
/// from these, and the conversions are documented in the README's type table.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// SQL NULL, a missing JSON key, or a blank mapped with `null_if_blank`.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// Text (CSV cells are always text until a field's `type` converts them).
    Text(String),
}

impl Value {
    /// Whether the value is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// True for NULL and for text that is empty or only white space.
    pub fn is_blank(&self) -> bool {
        match self {
            Value::Null => true,
            Value::Text(s) => s.trim().is_empty(),
            _ => false,
        }
    }

    /// The value as text, the way templates and CSV files write it (NULL is "").
    pub fn to_text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// Appends the text form to `out` without an intermediate allocation.
    pub fn push_text(&self, out: &mut String) {
        use std::fmt::Write;
        match self {
            Value::Null => {}
            Value::Text(s) => out.push_str(s),
            other => {
                let _ = write!(out, "{other}");
            }
        }
    }

    /// The value as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => serde_json::Value::String(s.clone()),
        }
    }

    /// Converts a JSON value; nested arrays and objects become their JSON text.
    pub fn from_json(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s),
            nested => Value::Text(nested.to_string()),
        }
    }

    /// Converts to `ty`, or says why the value does not fit.
    pub fn convert(self, ty: FieldType) -> Result<Value, ConvertError> {
        match (ty, self) {
            (FieldType::Text, Value::Text(s)) => Ok(Value::Text(s)),
            (_, v) => v.as_ref().convert(ty),
        }
    }

    /// A borrowed view of the value.
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Text(s) => ValueRef::Text(s),
        }
    }
}

/// Why a value does not fit a field's `type`; holds the value as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    /// A float with a fraction (or too large) for an integer field.
    #[error("{0} is not a whole number")]
    NotWhole(f64),
    /// Text that does not read as an integer.
    #[error("{0:?} is not an integer")]
    NotInteger(String),
    /// Text that does not read as a finite number.
    #[error("{0:?} is not a number")]
    NotNumber(String),
    /// Text that is none of the boolean words.
    #[error("{0:?} is not a boolean")]
    NotBoolean(String),
}

/// A borrowed [`Value`]: what a [`Row`] hands out without copying.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text.
    Text(&'a str),
}

impl ValueRef<'_> {
    /// An owned copy.
    pub fn to_owned(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Text(s) => Value::Text(s.to_owned()),
        }
    }

    /// The text form (NULL is "").
    pub fn to_text(self) -> String {
        let mut s = String::new();
        self.push_text(&mut s);
        s
    }

    /// Appends the text form to `out` (NULL adds nothing).
    pub fn push_text(self, out: &mut String) {
        use std::fmt::Write;
        match self {
            ValueRef::Null => {}
            ValueRef::Text(s) => out.push_str(s),
            ValueRef::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            ValueRef::Int(i) => {
                let _ = write!(out, "{i}");
            }
            ValueRef::Float(f) => {
                let _ = write!(out, "{f}");
            }
        }
    }

    /// Converts to `ty`, or says why the value does not fit.
    pub fn convert(self, ty: FieldType) -> Result<Value, ConvertError> {
        match (ty, self) {
            (_, ValueRef::Null) => Ok(Value::Null),
            (FieldType::Text, ValueRef::Text(s)) => Ok(Value::Text(s.to_owned())),
            (FieldType::Text, v) => {
                let mut s = String::new();
                v.push_text(&mut s);
                Ok(Value::Text(s))
            }
            (FieldType::Integer, ValueRef::Int(i)) => Ok(Value::Int(i)),
            (FieldType::Integer, ValueRef::Bool(b)) => Ok(Value::Int(b as i64)),
            (FieldType::Integer, ValueRef::Float(f)) => {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Ok(Value::Int(f as i64))
                } else {
                    Err(ConvertError::NotWhole(f))
                }
            }
            (FieldType::Integer, ValueRef::Text(s)) => {
                let t = s.trim();
                if t.is_empty() {
                    return Ok(Value::Null);
                }
                t.parse::<i64>()
                    .map(Value::Int)
                    .map_err(|_| ConvertError::NotInteger(s.to_owned()))
            }
            (FieldType::Number, ValueRef::Float(f)) => Ok(Value::Float(f)),
            (FieldType::Number, ValueRef::Int(i)) => Ok(Value::Float(i as f64)),
            (FieldType::Number, ValueRef::Bool(b)) => Ok(Value::Float(b as i64 as f64)),
            (FieldType::Number, ValueRef::Text(s)) => {
                let t = s.trim();
                if t.is_empty() {
                    return Ok(Value::Null);
                }
                match t.parse::<f64>() {
                    Ok(f) if f.is_finite() => Ok(Value::Float(f)),
                    _ => Err(ConvertError::NotNumber(s.to_owned())),
                }
            }
            (FieldType::Boolean, ValueRef::Bool(b)) => Ok(Value::Bool(b)),
            (FieldType::Boolean, ValueRef::Int(i)) => Ok(Value::Bool(i != 0)),
            (FieldType::Boolean, ValueRef::Float(f)) => Ok(Value::Bool(f != 0.0)),
            (FieldType::Boolean, ValueRef::Text(s)) => {
                match s.trim().to_ascii_lowercase().as_str() {
                    "" => Ok(Value::Null),
                    "true" | "t" | "yes" | "y" | "1" => Ok(Value::Bool(true)),
                    "false" | "f" | "no" | "n" | "0" => Ok(Value::Bool(false)),
                    _ => Err(ConvertError::NotBoolean(s.to_owned())),
                }
            }
        }
    }
}

/// One origin row: text fields in one buffer (CSV), or typed values.
///
/// A CSV record is kept as the reader produced it, so a row costs two
/// allocations however many fields it has.
#[derive(Debug, Clone)]
pub struct Row(RowData);

#[derive(Debug, Clone)]
enum RowData {
    Record(csv::StringRecord),
    Values(Vec<Value>),
}

impl Row {
    /// A row of typed values.
    pub fn from_values(values: Vec<Value>) -> Self {
        Row(RowData::Values(values))
    }

    /// A row of text fields, as a CSV reader produced it.
    pub fn from_record(record: csv::StringRecord) -> Self {
        Row(RowData::Record(record))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        match &self.0 {
            RowData::Record(r) => r.len(),
            RowData::Values(v) => v.len(),
        }
    }

    /// Whether the row has no fields.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Field `i`; NULL past the end.
    pub fn get(&self, i: usize) -> ValueRef<'_> {
        match &self.0 {
            RowData::Record(r) => r.get(i).map(ValueRef::Text).unwrap_or(ValueRef::Null),
            RowData::Values(v) => v.get(i).map(Value::as_ref).unwrap_or(ValueRef::Null),
        }
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = ValueRef<'_>> {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

/// The type a field's value is converted to before it is written (`type = "…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Text; any value converts.
    Text,
    /// A 64-bit integer; blank text becomes NULL.
    Integer,
    /// A 64-bit float; blank text becomes NULL.
    Number,
    /// true/false, yes/no, 1/0, t/f, y/n (any case); blank text becomes NULL.
    Boolean,
}

/// ISO 8601 with offset and 7 fractional digits, as the vendor writes times:
/// the one text form of a time in answers and in the stored log.
pub fn datetime_text(t: &chrono::DateTime<chrono::FixedOffset>) -> String {
    use chrono::Timelike;
    format!(
        "{}.{:07}{}",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.nanosecond() % 1_000_000_000 / 100,
        t.format("%:z")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_text_to_numbers_and_rejects_garbage() {
        assert_eq!(
            Value::from(" 42 ").convert(FieldType::Integer),
            Ok(Value::Int(42))
        );
        assert_eq!(
            Value::from("12.50").convert(FieldType::Number),
            Ok(Value::Float(12.5))
        );
        assert_eq!(Value::from("").convert(FieldType::Number), Ok(Value::Null));
        let err = Value::from("abc").convert(FieldType::Number).unwrap_err();
        assert_eq!(err.to_string(), "\"abc\" is not a number");
        assert_eq!(
            Value::from(" x ")
                .convert(FieldType::Integer)
                .unwrap_err()
                .to_string(),
            "\" x \" is not an integer"
        );
        assert_eq!(
            Value::from("maybe")
                .convert(FieldType::Boolean)
                .unwrap_err()
                .to_string(),
            "\"maybe\" is not a boolean"
        );
        assert!(Value::from("NaN").convert(FieldType::Number).is_err());
        assert_eq!(
            Value::from("Yes").convert(FieldType::Boolean),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            Value::Float(1.5)
                .convert(FieldType::Integer)
                .unwrap_err()
                .to_string(),
            "1.5 is not a whole number"
        );
    }

    #[test]
    fn blank_and_text_forms() {
        assert!(Value::Null.is_blank());
        assert!(Value::from("  ").is_blank());
        assert!(!Value::Int(0).is_blank());
        assert_eq!(Value::Float(2.5).to_text(), "2.5");
        assert_eq!(Value::Null.to_text(), "");
    }
}
