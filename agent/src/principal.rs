//! Who a person is to the agent: a user name, a uid, or `group:NAME`.
//! Admins of the admin socket and local approvers are principals; a caller
//! (its SO_PEERCRED uid and gid) is one of them by uid, user name, or
//! membership of a group, supplementary groups included.
use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Principal {
    User(String),
    Uid(u32),
    Group(String),
}

impl Principal {
    /// `name`, `uid:N` or `group:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(group) = text.strip_prefix("group:") {
            return if group.is_empty() {
                Err("\"group:\" needs a group name".into())
            } else {
                Ok(Principal::Group(group.to_owned()))
            };
        }
        if let Some(uid) = text.strip_prefix("uid:") {
            return uid
                .parse()
                .map(Principal::Uid)
                .map_err(|_| format!("{uid:?} is not a uid"));
        }
        if text.is_empty() {
            return Err("a user name cannot be empty".into());
        }
        Ok(Principal::User(text.to_owned()))
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::User(name) => write!(f, "{name}"),
            Principal::Uid(uid) => write!(f, "uid:{uid}"),
            Principal::Group(name) => write!(f, "group:{name}"),
        }
    }
}

/// Whether the caller with this uid and gid is one of `principals`.
pub fn caller_matches(uid: u32, gid: u32, principals: &[Principal]) -> bool {
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    principals.iter().any(|principal| match principal {
        Principal::Uid(admin) => *admin == uid,
        Principal::User(name) => user.as_ref().is_some_and(|u| &u.name == name),
        Principal::Group(name) => {
            let Some(group) = Group::from_name(name).ok().flatten() else {
                return false;
            };
            if group.gid.as_raw() == gid {
                return true;
            }
            user.as_ref().is_some_and(|u| {
                let Ok(cname) = std::ffi::CString::new(u.name.as_str()) else {
                    return false;
                };
                getgrouplist(&cname, Gid::from_raw(gid))
                    .is_ok_and(|groups| groups.contains(&group.gid))
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_uid_name_and_group() {
        assert!(caller_matches(0, 0, &[Principal::Uid(0)]));
        assert!(caller_matches(0, 0, &[Principal::User("root".into())]));
        assert!(caller_matches(0, 0, &[Principal::Group("root".into())]));
        assert!(!caller_matches(
            12345,
            12345,
            &[
                Principal::User("root".into()),
                Principal::Group("root".into())
            ]
        ));
        assert!(!caller_matches(
            0,
            0,
            &[Principal::Group("no-such-group-here".into())]
        ));
    }

    #[test]
    fn parsed_as_written() {
        for text in ["alice", "uid:1001", "group:oncall"] {
            assert_eq!(Principal::parse(text).unwrap().to_string(), text);
        }
        assert!(Principal::parse("group:").is_err());
        assert!(Principal::parse("uid:x").is_err());
        assert!(Principal::parse("").is_err());
    }
}
