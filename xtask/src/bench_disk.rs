//! `cargo xtask bench disk`: what one small durable write costs on the disk
//! holding the agent's state, by each way of making it durable, so the
//! session store's commit is picked by measurement. 512-byte records, one
//! durable write each, one after another.
use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, OpenOptionsExt},
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

const RECORD: usize = 512;

pub fn run(dir: &Path, writes: usize) -> Result<()> {
    anyhow::ensure!(writes > 0, "--writes must be at least 1");
    std::fs::create_dir_all(dir)?;
    let path = dir.join("interlock-disk-probe");
    let result = probe(&path, writes);
    let _ = std::fs::remove_file(&path);
    result
}

fn probe(path: &Path, writes: usize) -> Result<()> {
    // Written once, so that later writes change no block mapping.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(&vec![0u8; writes * RECORD], 0)?;
    file.sync_all()?;
    let dsync = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)?;
    println!(
        "\nOne {RECORD}-byte durable write, {writes} in a row, in {}",
        path.parent().unwrap_or(path).display()
    );
    println!("{:<56} {:>9} {:>9}", "way", "p50 µs", "p99 µs");
    let show = |name: &str, times: Vec<Duration>| {
        let (p50, p99) = percentiles(times);
        println!("{name:<56} {p50:>9.1} {p99:>9.1}");
    };
    show(
        "fdatasync, preallocated file",
        timed(&file, writes, |f| f.sync_data())?,
    );
    show(
        "fsync, preallocated file",
        timed(&file, writes, |f| f.sync_all())?,
    );
    show(
        "O_DSYNC write, preallocated file",
        timed(&dsync, writes, |_| Ok(()))?,
    );
    show(
        "sync_file_range (no device flush: not durable)",
        timed(&file, writes, sync_file_range)?,
    );
    file.set_len(0)?;
    file.sync_all()?;
    show(
        "fdatasync, file growing with each write",
        timed(&file, writes, |f| f.sync_data())?,
    );
    Ok(())
}

fn timed(
    file: &File,
    writes: usize,
    sync: impl Fn(&File) -> io::Result<()>,
) -> io::Result<Vec<Duration>> {
    let record = [b'x'; RECORD];
    (0..writes)
        .map(|i| {
            let started = Instant::now();
            file.write_all_at(&record, (i * RECORD) as u64)?;
            sync(file)?;
            Ok(started.elapsed())
        })
        .collect()
}

fn sync_file_range(file: &File) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid descriptor; the call only reads its arguments.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn percentiles(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}
