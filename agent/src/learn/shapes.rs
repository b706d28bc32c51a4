//! The shape of what varies between examples: an HTTP path's ids, an SSH
//! command's arguments. Fixed words stay; ids, and what differs from one
//! example to the next, become globs — the narrowest pattern that still
//! takes every example.
use std::collections::BTreeMap;

/// A path segment that names one thing among many: a number, a UUID, a
/// hex digest or id. A resource's id in a URL varies by nature, so it is
/// a glob even when only one was seen.
pub fn is_id(segment: &str) -> bool {
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    let uuid = segment.len() == 36
        && segment.split('-').map(str::len).eq([8, 4, 4, 4, 12])
        && hex(&segment.replace('-', ""));
    !segment.is_empty()
        && (segment.chars().all(|c| c.is_ascii_digit())
            || uuid
            || (segment.len() >= 12 && hex(segment) && segment.chars().any(|c| c.is_ascii_digit())))
}

/// An HTTP path with its ids as `*`: `/api/v1/items/17` is
/// `/api/v1/items/*`.
pub fn path_template(path: &str) -> String {
    path.split('/')
        .map(|segment| if is_id(segment) { "*" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

/// Commands (each its words) as patterns: commands with the same program
/// and number of words are one shape, in which a word the examples agree
/// on stays and one they differ on becomes `*` (or `dir/*`, when they are
/// paths in one directory). Returns each pattern's words with the indices
/// of the commands it came from, in a stable order.
pub fn command_patterns(commands: &[Vec<String>]) -> Vec<(Vec<String>, Vec<usize>)> {
    let mut shapes: BTreeMap<(&str, usize), Vec<usize>> = BTreeMap::new();
    for (i, words) in commands.iter().enumerate() {
        if let Some(program) = words.first() {
            shapes.entry((program, words.len())).or_default().push(i);
        }
    }
    shapes
        .into_values()
        .map(|members| {
            let first = &commands[members[0]];
            let words = (0..first.len())
                .map(|at| {
                    let values: Vec<&str> =
                        members.iter().map(|&i| commands[i][at].as_str()).collect();
                    varying(&values)
                })
                .collect();
            (words, members)
        })
        .collect()
}

/// One word position across examples: the word, if they agree. Else a
/// glob: `*` for words without `/`; for paths, one `*` per component
/// that differs when they are equally deep (`*` does not cross `/` in a
/// rule), or their shared directory with `**` below it.
fn varying(values: &[&str]) -> String {
    let first = values[0];
    if values.iter().all(|v| *v == first) {
        return first.to_owned();
    }
    if !values.iter().any(|v| v.contains('/')) {
        return "*".to_owned();
    }
    let depth = first.split('/').count();
    if values.iter().all(|v| v.split('/').count() == depth) {
        let components: Vec<Vec<&str>> = values.iter().map(|v| v.split('/').collect()).collect();
        return (0..depth)
            .map(|at| {
                let part = components[0][at];
                if components.iter().all(|c| c[at] == part) {
                    part
                } else {
                    "*"
                }
            })
            .collect::<Vec<_>>()
            .join("/");
    }
    let mut shared = first.rfind('/').map_or("", |end| &first[..=end]);
    for value in values {
        while !value.starts_with(shared) {
            let cut = shared[..shared.len() - 1]
                .rfind('/')
                .map_or(0, |end| end + 1);
            shared = &shared[..cut];
        }
    }
    format!("{shared}**")
}

/// A pattern word as a rule writes it: quoted when the shell would split
/// or expand it (a glob stays bare: it is the pattern's).
pub fn pattern_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,*?".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(lines: &[&str]) -> Vec<Vec<String>> {
        lines
            .iter()
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .collect()
    }

    fn patterns(lines: &[&str]) -> Vec<String> {
        command_patterns(&words(lines))
            .into_iter()
            .map(|(words, _)| words.join(" "))
            .collect()
    }

    #[test]
    fn what_varies_becomes_a_glob_and_what_is_fixed_stays() {
        // Numbers, versions and ids that vary; words that do not.
        assert_eq!(
            patterns(&[
                "./deploy.sh v1.2.3 --env staging",
                "./deploy.sh v1.2.4 --env staging",
                "./deploy.sh 2026-11-30 --env staging",
            ]),
            ["./deploy.sh * --env staging"]
        );
        // Paths in one directory keep it; paths that share only `/` do not.
        // Paths: a `*` per component that differs, when equally deep;
        // else their shared directory and all below it.
        assert_eq!(
            patterns(&[
                "tar -xzf /srv/releases/app-1.tgz",
                "tar -xzf /srv/releases/app-2.tgz",
                "cat /srv/releases/v1/NOTES",
                "cat /srv/releases/v2/NOTES",
            ]),
            ["cat /srv/releases/*/NOTES", "tar -xzf /srv/releases/*"]
        );
        assert_eq!(patterns(&["ls /srv/a/x", "ls /srv/b"]), ["ls /srv/**"]);
        assert_eq!(
            patterns(&["ls /etc/hosts", "ls /var/log/syslog"]),
            ["ls /**"]
        );
        assert_eq!(patterns(&["ls a/b", "ls c"]), ["ls **"]);
        // A quoted argument is one word: varying, one glob.
        let quoted = vec![
            vec![
                "git".to_owned(),
                "commit".to_owned(),
                "-m".to_owned(),
                "fix the build".to_owned(),
            ],
            vec![
                "git".to_owned(),
                "commit".to_owned(),
                "-m".to_owned(),
                "bump".to_owned(),
            ],
        ];
        let (pattern, from) = &command_patterns(&quoted)[0];
        assert_eq!(pattern.join(" "), "git commit -m *");
        assert_eq!(from, &[0, 1]);
        // Every example is allowed by its pattern, as a rule reads it.
        for lines in [
            &[
                "./deploy.sh v1 --env staging",
                "./deploy.sh v2 --env staging",
            ][..],
            &["cat /srv/releases/v1/NOTES", "cat /srv/releases/v2/NOTES"],
            &["ls /srv/a/x", "ls /srv/b"],
            &["ls /etc/hosts", "ls /var/log/syslog"],
            &["ls a/b", "ls c"],
        ] {
            for (pattern, from) in command_patterns(&words(lines)) {
                let text: Vec<String> = pattern.iter().map(|w| pattern_word(w)).collect();
                let rule = crate::policy::CommandPattern::new(&text.join(" ")).unwrap();
                for i in from {
                    let line = crate::policy::CommandLine::parse(lines[i]);
                    assert!(
                        rule.matches(&line.commands[0], crate::policy::Match::Allow),
                        "{text:?} does not allow {:?}",
                        lines[i]
                    );
                }
            }
        }
        // One example: exactly itself; another number of words: its own shape.
        assert_eq!(
            patterns(&["systemctl restart app", "systemctl status"]),
            ["systemctl status", "systemctl restart app"]
        );
    }

    #[test]
    fn ids_in_paths_are_globs_and_names_are_not() {
        assert_eq!(path_template("/api/v1/items/17"), "/api/v1/items/*");
        assert_eq!(
            path_template("/orders/3f2a9c1d-0b7e-4c55-9a1e-5d6f7a8b9c0d/lines"),
            "/orders/*/lines"
        );
        assert_eq!(
            path_template("/blobs/sha256/9f86d081884c7d65"),
            "/blobs/sha256/*"
        );
        // Names, versions and words stay.
        assert_eq!(path_template("/api/v2/users/ann"), "/api/v2/users/ann");
        assert_eq!(path_template("/v2/cafe/manifests"), "/v2/cafe/manifests");
        assert_eq!(path_template("/"), "/");
    }

    #[test]
    fn words_are_quoted_when_the_shell_would_read_them_otherwise() {
        assert_eq!(pattern_word("--env=staging"), "--env=staging");
        assert_eq!(pattern_word("/srv/releases/*"), "/srv/releases/*");
        assert_eq!(pattern_word("fix the build"), "'fix the build'");
        assert_eq!(pattern_word("it's"), r"'it'\''s'");
        assert_eq!(pattern_word("$HOME"), "'$HOME'");
    }
}
