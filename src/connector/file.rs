//! Shared plumbing of the file destinations (CSV, JSON): temporary file,
//! atomic rename at the end, append mode, and preview that writes nothing.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConnectorError;

/// How a file destination treats an existing file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileMode {
    /// Replace the file when the job finishes (written to a temporary file first).
    #[default]
    Overwrite,
    /// Add rows at the end; a header is written only into an empty file.
    Append,
}

/// Where a file destination writes, and how it is put in place at the end.
pub(crate) struct FileTarget {
    pub(crate) writer: Box<dyn Write + Send>,
    pub(crate) is_empty: bool,
    pub(crate) finish: FileFinish,
}

/// What to do with a file destination when the job ends.
pub(crate) enum FileFinish {
    /// Nothing (append mode, or preview).
    Nothing,
    /// Rename the temporary file over the target.
    Rename { tmp: PathBuf, target: PathBuf },
}

impl FileTarget {
    pub(crate) fn open(path: &Path, mode: FileMode, preview: bool) -> Result<Self, ConnectorError> {
        let open_err = |e: std::io::Error| ConnectorError::Open {
            what: format!("file {}", path.display()),
            reason: e.to_string(),
            cause: Some(e.into()),
        };
        if preview {
            let is_empty = mode == FileMode::Overwrite
                || std::fs::metadata(path)
                    .map(|m| m.len() == 0)
                    .unwrap_or(true);
            return Ok(FileTarget {
                writer: Box::new(std::io::sink()),
                is_empty,
                finish: FileFinish::Nothing,
            });
        }
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        match mode {
            FileMode::Append => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(open_err)?;
                let is_empty = f.metadata().map(|m| m.len() == 0).unwrap_or(true);
                Ok(FileTarget {
                    writer: Box::new(BufWriter::with_capacity(256 * 1024, f)),
                    is_empty,
                    finish: FileFinish::Nothing,
                })
            }
            FileMode::Overwrite => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Unique per writer, so two runs of one job never share a temporary file.
                let tmp = path.with_file_name(format!(
                    ".{name}.{}.tidepool-tmp",
                    uuid::Uuid::new_v4().simple()
                ));
                let f = File::create(&tmp).map_err(open_err)?;
                Ok(FileTarget {
                    writer: Box::new(BufWriter::with_capacity(256 * 1024, f)),
                    is_empty: true,
                    finish: FileFinish::Rename {
                        tmp,
                        target: path.to_owned(),
                    },
                })
            }
        }
    }
}

impl FileFinish {
    pub(crate) fn run(self) -> Result<(), ConnectorError> {
        match self {
            FileFinish::Nothing => Ok(()),
            FileFinish::Rename { tmp, target } => std::fs::rename(&tmp, &target).map_err(|e| {
                ConnectorError::failed(format!(
                    "cannot move {} to {}: {e}",
                    tmp.display(),
                    target.display()
                ))
            }),
        }
    }
}
