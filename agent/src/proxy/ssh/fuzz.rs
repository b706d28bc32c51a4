//! What the fuzz targets (`fuzz/`) drive for SSH: the readers of bytes a
//! workload or a server sends through an allowed channel. None may panic.
use std::sync::{Arc, LazyLock};

use super::sftp::SftpLog;
use crate::masking::{MaskKey, MaskSet, StreamMask};

/// SFTP packets both ways, and command output through the stream mask,
/// cut at the points the input chooses (its first byte is the cut length).
pub fn channel(data: &[u8]) {
    static MASKS: LazyLock<Option<Arc<MaskSet>>> = LazyLock::new(|| {
        let masks = crate::proxy::postgres::fuzz::compile_masks(&[
            r#"pattern = "api_key""#,
            r#"regex = "tok-[a-z]+""#,
        ]);
        let refs: Vec<&crate::policy::Mask> = masks.iter().collect();
        MaskSet::compile(&refs, &Default::default(), Arc::new(MaskKey::new([7; 32])))
            .ok()
            .map(Arc::new)
    });
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let mut sftp = SftpLog::default();
    let mut events = 0usize;
    let mut output = MASKS.as_ref().map(|m| StreamMask::new(m.clone()));
    for (i, chunk) in data.chunks(cut).enumerate() {
        if i % 2 == 0 {
            sftp.client_sent(chunk, &mut |_| events += 1);
        } else {
            sftp.server_sent(chunk);
        }
        if let Some(output) = &mut output {
            let ext = (i % 3 == 0).then_some(1);
            let _ = output.push(ext, chunk);
        }
    }
    if let Some(output) = &mut output {
        let _ = output.flush();
    }
}

/// An exec request's command line through the shell parser and the
/// matching of rule patterns.
pub fn command_line(data: &[u8]) {
    static PATTERNS: LazyLock<Vec<crate::policy::CommandPattern>> = LazyLock::new(|| {
        [
            "rm -rf *",
            "** sudo **",
            "echo *",
            "systemctl restart app*",
            "git-upload-pack *",
        ]
        .iter()
        .map(|p| crate::policy::CommandPattern::new(p).expect("a valid pattern"))
        .collect()
    });
    let line = crate::policy::CommandLine::parse(&String::from_utf8_lossy(data));
    for command in &line.commands {
        let _ = command.to_string();
        for pattern in PATTERNS.iter() {
            let _ = pattern.matches(command, crate::policy::Match::Any);
            let _ = pattern.matches(command, crate::policy::Match::Allow);
        }
    }
    // A pattern is parsed by the same reader.
    let _ = crate::policy::CommandPattern::new(&String::from_utf8_lossy(data));
}
