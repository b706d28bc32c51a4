//! Authorizing an admin-socket caller from its SO_PEERCRED uid and gid.
use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

use crate::config::Principal;

/// Whether the caller with this uid and gid is one of `principals` (by
/// uid, user name, or membership of a group, supplementary included).
pub fn caller_matches(uid: u32, gid: u32, admins: &[Principal]) -> bool {
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    admins.iter().any(|principal| match principal {
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
}
