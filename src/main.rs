//! The `tidepool` command.

mod cli;

// Rows are handed from the reader thread to writer threads; glibc's malloc
// serialises such cross-thread frees on arena locks, mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
