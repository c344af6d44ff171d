//! The CSV origin over bytes in memory: the first byte picks the connection's
//! settings (delimiter, quote, header, encoding), the rest is the file.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use tidepool::connector::Flow;
use tidepool::connector::csv::CsvConfig;
use tidepool::connector::file::FileMode;

const DELIMITERS: [char; 4] = [',', ';', '\t', '|'];
const QUOTES: [char; 2] = ['"', '\''];
const ENCODINGS: [Option<&str>; 4] = [
    None,
    Some("windows-1252"),
    Some("utf-16le"),
    Some("shift_jis"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&settings, file)) = data.split_first() else {
        return;
    };
    let s = settings as usize;
    let config = CsvConfig {
        path: PathBuf::from("in.csv"),
        delimiter: DELIMITERS[s & 3],
        quote: QUOTES[(s >> 2) & 1],
        header: (s >> 3) & 1 == 0,
        mode: FileMode::Overwrite,
        encoding: ENCODINGS[(s >> 4) & 3].map(str::to_owned),
    };
    let input = Box::new(std::io::Cursor::new(file.to_vec()));
    let Ok(mut origin) = config.origin_from_reader(input, PathBuf::from("in.csv")) else {
        return;
    };
    let columns = origin.columns().len();
    let _ = origin.read(&mut |row| {
        if let Ok(row) = row {
            // A row that reaches the job has exactly the header's fields.
            assert_eq!(row.len(), columns);
        }
        Flow::Continue
    });
});
