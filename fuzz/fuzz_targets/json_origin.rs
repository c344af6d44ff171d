//! The JSON origin over bytes in memory: the first byte picks the layout
//! (an array, JSON Lines, or by the file's extension), the rest is the file.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use tidepool::connector::Flow;
use tidepool::connector::file::FileMode;
use tidepool::connector::json::{JsonConfig, JsonFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&settings, file)) = data.split_first() else {
        return;
    };
    let (format, path) = match settings & 3 {
        0 => (None, "in.json"),
        1 => (None, "in.jsonl"),
        2 => (Some(JsonFormat::Array), "in.txt"),
        _ => (Some(JsonFormat::Lines), "in.txt"),
    };
    let config = JsonConfig {
        path: PathBuf::from(path),
        format,
        mode: FileMode::Overwrite,
    };
    let fields = ["id", "name", "City", "amount"].map(String::from);
    let input = Box::new(std::io::Cursor::new(file.to_vec()));
    let mut origin = config.origin_from_reader(input, PathBuf::from(path), &fields);
    let _ = origin.read(&mut |row| {
        if let Ok(row) = row {
            // Every row has the fields the job reads, present or null.
            assert_eq!(row.len(), fields.len());
        }
        Flow::Continue
    });
});
