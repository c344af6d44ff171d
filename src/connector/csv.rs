//! CSV files: an origin that streams records, a destination that writes rows.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::file::{FileFinish, FileMode, FileTarget};
use super::{
    Capabilities, Connector, ConnectorError, Destination, DestinationRequest, Flow, Origin,
    OriginInput, OriginRequest, RowAction, RowRead, WriteResult, resolve_path,
};
use crate::connector::StageAction;
use crate::value::{Row, Value};
use encoding_rs::Encoding;

/// `kind = "csv"`: a delimited text file, UTF-8 with or without a BOM, or
/// the `encoding` it names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The file; relative to the project folder.
    pub path: PathBuf,
    /// The field separator (one ASCII character). Default `,`.
    #[serde(default = "comma")]
    pub delimiter: char,
    /// The quote character (one ASCII character). Default `"`.
    #[serde(default = "double_quote")]
    pub quote: char,
    /// Whether the first record names the fields. Without a header the fields
    /// are named `Column1`, `Column2`, …
    #[serde(default = "yes")]
    pub header: bool,
    /// As a destination: `overwrite` the file (default) or `append` to it.
    #[serde(default)]
    pub mode: FileMode,
    /// The file's character encoding, a WHATWG label (`windows-1252`,
    /// `iso-8859-15`, `utf-16le`, `shift_jis`, …). Default UTF-8.
    pub encoding: Option<String>,
}

impl CsvConfig {
    /// The encoding, unless it is UTF-8 (read and written as it is).
    fn encoding(&self) -> Result<Option<&'static Encoding>, ConnectorError> {
        let Some(label) = &self.encoding else {
            return Ok(None);
        };
        let enc = Encoding::for_label(label.trim().as_bytes()).ok_or_else(|| {
            ConnectorError::schema(format!(
                "unknown csv encoding {label:?}: give a label such as utf-8, windows-1252, iso-8859-15, utf-16le or shift_jis"
            ))
        })?;
        Ok((enc != encoding_rs::UTF_8).then_some(enc))
    }

    /// The origin over `file`'s bytes, as [`Connector::open_origin`] opens it
    /// (`path` only names the file in messages).
    pub fn origin_from_reader(
        &self,
        file: Box<dyn Read + Send>,
        path: PathBuf,
    ) -> Result<Box<dyn Origin>, ConnectorError> {
        let input: Box<dyn Read + Send> = match self.encoding()? {
            None => file,
            // Decoded to UTF-8 as it is read (a BOM, if any, still wins).
            Some(enc) => Box::new(
                encoding_rs_io::DecodeReaderBytesBuilder::new()
                    .encoding(Some(enc))
                    .build(file),
            ),
        };
        let mut reader = ::csv::ReaderBuilder::new()
            .delimiter(ascii(self.delimiter, "delimiter")?)
            .quote(ascii(self.quote, "quote")?)
            .has_headers(false)
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .from_reader(input);
        let mut first = ::csv::StringRecord::new();
        let has_first = read_record(&mut reader, &mut first, &path)?;
        let (columns, pending) = if self.header {
            let cols: Vec<String> = first
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let c = if i == 0 {
                        c.trim_start_matches('\u{feff}')
                    } else {
                        c
                    };
                    c.trim().to_owned()
                })
                .collect();
            (cols, None)
        } else {
            let cols = (1..=first.len()).map(|i| format!("Column{i}")).collect();
            (cols, has_first.then_some(first))
        };
        Ok(Box::new(CsvOrigin {
            path,
            reader,
            columns,
            pending,
        }))
    }
}

fn comma() -> char {
    ','
}
fn double_quote() -> char {
    '"'
}
fn yes() -> bool {
    true
}

fn ascii(c: char, what: &str) -> Result<u8, ConnectorError> {
    if c.is_ascii() {
        Ok(c as u8)
    } else {
        Err(ConnectorError::schema(format!(
            "csv {what} must be one ASCII character, not {c:?}"
        )))
    }
}

impl Connector for CsvConfig {
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
            what: format!("csv file {}", path.display()),
            reason: e.to_string(),
            cause: Some(e.into()),
        })?;
        self.origin_from_reader(Box::new(file), path)
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
                "a csv destination takes exactly one stage".into(),
            ));
        };
        let path = resolve_path(req.base_dir, &self.path);
        let header: Vec<String> = stage.columns.iter().map(|c| c.name.clone()).collect();
        let encoding = self.encoding()?;
        if let Some(enc) = encoding
            && !enc.is_ascii_compatible()
        {
            return Err(ConnectorError::schema(format!(
                "a csv destination cannot be written in {}: choose an ASCII-compatible encoding",
                enc.name()
            )));
        }
        let target = FileTarget::open(&path, self.mode, req.preview)?;
        let write_header = self.header && target.is_empty;
        let writer = ::csv::WriterBuilder::new()
            .delimiter(ascii(self.delimiter, "delimiter")?)
            .quote(ascii(self.quote, "quote")?)
            .from_writer(target.writer);
        let mut dest = CsvDestination {
            writer,
            finish: target.finish,
            encoding,
            header,
            buf: String::new(),
        };
        if write_header {
            let names: Vec<Value> = dest
                .header
                .iter()
                .map(|h| Value::from(h.as_str()))
                .collect();
            dest.write_row(&names)
                .map_err(|e| ConnectorError::schema(format!("the header: {e}")))?
                .map_err(ConnectorError::schema)?;
        }
        Ok(Box::new(dest))
    }
}

/// Reads one record; `Ok(false)` at the end. Only I/O errors end the job here.
fn read_record(
    reader: &mut ::csv::Reader<Box<dyn Read + Send>>,
    rec: &mut ::csv::StringRecord,
    path: &Path,
) -> Result<bool, ConnectorError> {
    match reader.read_record(rec) {
        Ok(more) => Ok(more),
        Err(e) => Err(ConnectorError::failed(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

struct CsvOrigin {
    path: PathBuf,
    reader: ::csv::Reader<Box<dyn Read + Send>>,
    columns: Vec<String>,
    pending: Option<::csv::StringRecord>,
}

impl CsvOrigin {
    fn row(&self, rec: ::csv::StringRecord) -> RowRead {
        if rec.len() != self.columns.len() {
            return Err(format!(
                "the line has {} fields where the header has {} (line {})",
                rec.len(),
                self.columns.len(),
                rec.position().map(|p| p.line()).unwrap_or(0)
            ));
        }
        Ok(Row::from_record(rec))
    }
}

impl Origin for CsvOrigin {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        if let Some(first) = self.pending.take()
            && sink(self.row(first)) == Flow::Stop
        {
            return Ok(());
        }
        let mut rec = ::csv::StringRecord::new();
        loop {
            let row = match self.reader.read_record(&mut rec) {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    // Hand the record over whole and read the next into a fresh one.
                    let next =
                        ::csv::StringRecord::with_capacity(rec.as_slice().len() + 16, rec.len());
                    self.row(std::mem::replace(&mut rec, next))
                }
                Err(e) => match e.kind() {
                    ::csv::ErrorKind::Utf8 { pos, err } => Err(format!(
                        "the line is not valid UTF-8 (line {}, field {}): save the file as UTF-8, or give the connection its encoding (encoding = \"windows-1252\")",
                        pos.as_ref().map(|p| p.line()).unwrap_or(0),
                        err.field() + 1
                    )),
                    _ => {
                        return Err(ConnectorError::failed(format!(
                            "reading {}: {e}",
                            self.path.display()
                        )));
                    }
                },
            };
            if sink(row) == Flow::Stop {
                return Ok(());
            }
        }
    }
}

struct CsvDestination {
    writer: ::csv::Writer<Box<dyn Write + Send>>,
    finish: FileFinish,
    /// Fields are encoded to this before they are written (`None`: UTF-8).
    encoding: Option<&'static Encoding>,
    /// The column names (for messages).
    header: Vec<String>,
    /// A field's text, reused from row to row.
    buf: String,
}

impl CsvDestination {
    /// Writes one record; `Ok(Err)`: a value the encoding cannot hold (nothing written).
    fn write_row(&mut self, row: &[Value]) -> Result<Result<(), String>, ConnectorError> {
        let buf = &mut self.buf;
        match self.encoding {
            None => {
                for v in row {
                    buf.clear();
                    v.push_text(buf);
                    self.writer.write_field(&*buf).map_err(ConnectorError::io)?;
                }
            }
            Some(enc) => {
                let mut fields = Vec::with_capacity(row.len());
                for (i, v) in row.iter().enumerate() {
                    buf.clear();
                    v.push_text(buf);
                    let (bytes, _, unmappable) = enc.encode(buf);
                    if unmappable {
                        return Ok(Err(format!(
                            "column {:?}: {buf:?} cannot be written in {}",
                            self.header.get(i).map(String::as_str).unwrap_or(""),
                            enc.name()
                        )));
                    }
                    fields.push(bytes.into_owned());
                }
                for f in &fields {
                    self.writer.write_field(f).map_err(ConnectorError::io)?;
                }
            }
        }
        self.writer
            .write_record(None::<&[u8]>)
            .map_err(ConnectorError::io)?;
        Ok(Ok(()))
    }
}

impl Destination for CsvDestination {
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
            out.push(self.write_row(row)?.map(|()| RowAction::Insert));
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), ConnectorError> {
        self.writer.flush().map_err(ConnectorError::io)
    }

    fn rollback(&mut self) -> Result<(), ConnectorError> {
        // Rows already handed to the file cannot be taken back; a file
        // destination fails only on I/O errors, which end the job.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), ConnectorError> {
        let this = *self;
        let mut inner = this
            .writer
            .into_inner()
            .map_err(|e| ConnectorError::io(e.into_error()))?;
        inner.flush().map_err(ConnectorError::io)?;
        drop(inner);
        this.finish.run()
    }
}
