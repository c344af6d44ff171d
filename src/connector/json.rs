//! JSON files: an array of objects, or JSON Lines (one object per line).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};

use super::file::{FileFinish, FileMode, FileTarget};
use super::{
    Capabilities, Connector, ConnectorError, Destination, DestinationRequest, Flow, Origin,
    OriginInput, OriginRequest, RowAction, RowRead, WriteResult, resolve_path,
};
use crate::connector::StageAction;
use crate::value::{Row, Value};

/// `kind = "json"`: a JSON array of objects, or JSON Lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonConfig {
    /// The file; relative to the project folder.
    pub path: PathBuf,
    /// `array` or `lines`; by default `lines` for `.jsonl`/`.ndjson`, else `array`.
    pub format: Option<JsonFormat>,
    /// As a destination: `overwrite` (default) or `append` (lines only).
    #[serde(default)]
    pub mode: FileMode,
}

/// The layout of a JSON file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonFormat {
    /// `[ {…}, {…} ]`
    Array,
    /// One object per line.
    Lines,
}

impl JsonConfig {
    fn format_for(&self, path: &std::path::Path) -> JsonFormat {
        self.format
            .unwrap_or_else(|| match path.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "ndjson") => JsonFormat::Lines,
                _ => JsonFormat::Array,
            })
    }

    /// The origin over `file`'s bytes reading `fields`, as
    /// [`Connector::open_origin`] opens it (`path` names the file in messages
    /// and, by its extension, the default format).
    pub fn origin_from_reader(
        &self,
        file: Box<dyn Read + Send>,
        path: PathBuf,
        fields: &[String],
    ) -> Box<dyn Origin> {
        Box::new(JsonOrigin {
            format: self.format_for(&path),
            path,
            file: Some(file),
            columns: fields.to_vec(),
        })
    }
}

impl Connector for JsonConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::File(&self.path)
    }

    fn file_path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: &[StageAction::Insert],
            origin: OriginInput::File,
            needs_table: false,
            max_writers: Some(1),
            batch_size: 1000,
        }
    }

    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError> {
        let path = resolve_path(req.base_dir, req.path.unwrap_or(&self.path));
        let file = File::open(&path).map_err(|e| ConnectorError::Open {
            what: format!("json file {}", path.display()),
            reason: e.to_string(),
            cause: Some(e.into()),
        })?;
        Ok(self.origin_from_reader(Box::new(file), path, req.fields))
    }

    fn open_lookup(
        &self,
        base_dir: &std::path::Path,
    ) -> Result<Box<dyn super::Lookup>, ConnectorError> {
        Ok(Box::new(super::FileLookup::new(self.clone(), base_dir)))
    }

    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        let [stage] = req.stages else {
            return Err(ConnectorError::Schema(
                "a json destination takes exactly one stage".into(),
            ));
        };
        let path = resolve_path(req.base_dir, &self.path);
        let format = self.format_for(&path);
        if format == JsonFormat::Array && self.mode == FileMode::Append {
            return Err(ConnectorError::Schema(
                "a json array file cannot be appended to: use format = \"lines\" or mode = \"overwrite\"".into(),
            ));
        }
        let mut target = FileTarget::open(&path, self.mode, req.preview)?;
        if format == JsonFormat::Array {
            target.writer.write_all(b"[").map_err(ConnectorError::io)?;
        }
        Ok(Box::new(JsonDestination {
            format,
            columns: stage.columns.iter().map(|c| c.name.clone()).collect(),
            writer: target.writer,
            finish: target.finish,
            first: true,
        }))
    }
}

struct JsonOrigin {
    format: JsonFormat,
    path: PathBuf,
    file: Option<Box<dyn Read + Send>>,
    columns: Vec<String>,
}

impl JsonOrigin {
    fn row(&self, v: serde_json::Value) -> RowRead {
        let serde_json::Value::Object(mut map) = v else {
            return Err(format!(
                "the record is a JSON {}, not an object",
                json_type(&v)
            ));
        };
        Ok(Row::from_values(
            self.columns
                .iter()
                .map(|c| {
                    let v = map.remove(c).or_else(|| {
                        let key = map.keys().find(|k| k.eq_ignore_ascii_case(c))?.clone();
                        map.remove(&key)
                    });
                    v.map(Value::from_json).unwrap_or(Value::Null)
                })
                .collect(),
        ))
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Streams the elements of a JSON array to a callback, one at a time, so a
/// file of any size is read in constant memory.
struct Elements<'a> {
    each: &'a mut dyn FnMut(serde_json::Value) -> Flow,
    stopped: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            if (self.each)(v) == Flow::Stop {
                *self.stopped = true;
                return Err(serde::de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

impl Origin for JsonOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let reader = BufReader::with_capacity(256 * 1024, file);
        match self.format {
            JsonFormat::Lines => {
                for (i, line) in reader.lines().enumerate() {
                    let line = line.map_err(|e| {
                        ConnectorError::failed(format!("reading {}: {e}", self.path.display()))
                    })?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let row = serde_json::from_str(&line)
                        .map_err(|e| format!("line {} is not valid JSON: {e}", i + 1))
                        .and_then(|v| self.row(v));
                    if sink(row) == Flow::Stop {
                        break;
                    }
                }
                Ok(())
            }
            JsonFormat::Array => {
                let mut stopped = false;
                let mut each = |v: serde_json::Value| sink(self.row(v));
                let mut de = serde_json::Deserializer::from_reader(reader);
                let res = Elements {
                    each: &mut each,
                    stopped: &mut stopped,
                }
                .deserialize(&mut de)
                .and_then(|()| de.end());
                match res {
                    Ok(()) => Ok(()),
                    Err(_) if stopped => Ok(()),
                    Err(e) => Err(ConnectorError::failed(format!(
                        "{} is not a valid JSON array of objects: {e}",
                        self.path.display()
                    ))),
                }
            }
        }
    }
}

struct JsonDestination {
    format: JsonFormat,
    columns: Vec<String>,
    writer: Box<dyn Write + Send>,
    finish: FileFinish,
    first: bool,
}

impl Destination for JsonDestination {
    fn begin(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn write(
        &mut self,
        _stage: usize,
        rows: &[&[Value]],
    ) -> Result<Vec<WriteResult>, ConnectorError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let obj: serde_json::Map<String, serde_json::Value> = self
                .columns
                .iter()
                .zip(row.iter())
                .map(|(c, v)| (c.clone(), v.to_json()))
                .collect();
            let sep: &[u8] = match (self.format, self.first) {
                (JsonFormat::Array, true) => b"\n",
                (JsonFormat::Array, false) => b",\n",
                (JsonFormat::Lines, _) => b"",
            };
            self.first = false;
            self.writer.write_all(sep).map_err(ConnectorError::io)?;
            serde_json::to_writer(&mut self.writer, &obj).map_err(ConnectorError::io)?;
            if self.format == JsonFormat::Lines {
                self.writer.write_all(b"\n").map_err(ConnectorError::io)?;
            }
            out.push(Ok(RowAction::Insert));
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        self.writer.flush().map_err(ConnectorError::io)
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        let mut this = *self;
        if this.format == JsonFormat::Array {
            this.writer
                .write_all(if this.first { b"]\n" } else { b"\n]\n" })
                .map_err(ConnectorError::io)?;
        }
        this.writer.flush().map_err(ConnectorError::io)?;
        drop(this.writer);
        this.finish.run()
    }
}
