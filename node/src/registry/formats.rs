//! Which command formats every member applies, so that a rolling upgrade never hands an older
//! node a log entry it cannot read.
//!
//! Each build applies commands up to [`STATE_FORMAT`]; each command has the format of the
//! release that introduced it (`Command::format`). Members say their format in their answer
//! to `Ping` (absent from an mcpd older than the field: format 1). The leader pings every
//! member each second (placement) and records the answers here; before it proposes a command
//! it checks that every current member applies that command's format, else the write is
//! refused with `upgrade_in_progress` (503) until the last member is upgraded. A member not
//! heard from yet counts as format 1: a new leader refuses a newer command for the second it
//! takes to hear from everyone, never proposes one an older node would choke on.
//!
//! An older node that met an entry it cannot decode would stop applying the log (and panic
//! at its next start), and a log is applied in order: one such entry would stop every older
//! member until it was upgraded.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::state::{Command, MembershipChange, STATE_FORMAT};

/// The format of a member that does not say (an mcpd older than the field).
pub const OLDEST: u32 = 1;

/// The members that must apply `command`: all of `members` but one it removes, when the
/// record of its removal commits without it. A member being removed need not read that
/// record: it is often dead (why it is removed, and never heard from, so it would count as the
/// oldest), and a live one leaves right after. But a voter whose vote the commit needs (the
/// others are no majority of `voters` without it: two voters) must read it.
pub fn readers(
    command: &Command,
    members: impl IntoIterator<Item = u64>,
    voters: &BTreeSet<u64>,
) -> Vec<u64> {
    let leaving = match command {
        Command::ChangeMembership {
            change: MembershipChange::Remove { id },
        } => Some(*id),
        _ => None,
    }
    .filter(|id| !voters.contains(id) || voters.len() - 1 > voters.len() / 2);
    members
        .into_iter()
        .filter(|id| Some(*id) != leaving)
        .collect()
}

/// How long a member's answer counts: a few of the leader's pings (one a second). A member
/// stopped for a rollback is then counted as the oldest again soon after.
const FRESH: Duration = Duration::from_secs(3);

/// Whether an answer given at `at` still counts.
fn fresh(at: &Instant) -> bool {
    at.elapsed() < FRESH
}

/// The command formats members last said they apply, and when, by node id.
#[derive(Debug, Default)]
pub struct MemberFormats(Mutex<HashMap<u64, (u32, Instant)>>);

impl MemberFormats {
    /// Records a member's answer to `Ping`.
    pub fn note(&self, node: u64, format: Option<u32>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(node, (format.unwrap_or(OLDEST), Instant::now()));
    }

    /// A member did not answer: it may come back as another version.
    pub fn forget(&self, node: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    /// The newest format every one of `members` applies (`me` applies `mine`).
    pub fn floor(&self, me: u64, mine: u32, members: impl IntoIterator<Item = u64>) -> u32 {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        members
            .into_iter()
            .map(|id| {
                if id == me {
                    mine
                } else {
                    m.get(&id)
                        .filter(|(_, at)| fresh(at))
                        .map_or(OLDEST, |(format, _)| *format)
                }
            })
            .min()
            .unwrap_or(mine)
    }

    /// The members of `members` (other than `me`) not heard from lately: a new leader's, or a
    /// new member. The leader asks them before it counts them as the oldest.
    pub fn unheard(&self, me: u64, members: &[u64]) -> Vec<u64> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        members
            .iter()
            .copied()
            .filter(|id| *id != me && m.get(id).is_none_or(|(_, at)| !fresh(at)))
            .collect()
    }

    /// `Err` naming the command and what it waits for, when not every one of `readers` applies
    /// it.
    pub fn admit(&self, command: &Command, me: u64, readers: &[u64]) -> Result<(), String> {
        self.admit_format(
            command.format(),
            command.label(),
            me,
            STATE_FORMAT,
            readers.iter().copied(),
        )
        .map_err(|upgrade| match self.unheard(me, readers).as_slice() {
            [] => upgrade,
            silent => format!(
                "`{}` needs every member to apply command format {}, and node(s) {silent:?} did not answer (a member not heard from may run an older release): bring them back, or remove them first, then retry",
                command.label(),
                command.format()
            ),
        })
    }

    fn admit_format(
        &self,
        needs: u32,
        label: &str,
        me: u64,
        mine: u32,
        members: impl IntoIterator<Item = u64>,
    ) -> Result<(), String> {
        let floor = self.floor(me, mine, members);
        if needs <= floor {
            return Ok(());
        }
        Err(format!(
            "a rolling upgrade is in progress: `{}` needs every member to apply command format {needs}, and a member applies {floor}; upgrade the remaining members, then retry",
            label
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_oldest_member_and_an_unheard_member_counts_as_the_oldest() {
        let f = MemberFormats::default();
        assert_eq!(f.floor(1, 2, [1]), 2);
        f.note(2, Some(3));
        assert_eq!(f.floor(1, 2, [1, 2]), 2);
        assert_eq!(
            f.floor(1, 2, [1, 2, 3]),
            OLDEST,
            "node 3 was never heard from"
        );
        f.note(3, None);
        assert_eq!(
            f.floor(2, 3, [2, 3]),
            OLDEST,
            "an mcpd that does not say is the oldest"
        );
        f.note(3, Some(7));
        assert_eq!(f.floor(2, 3, [2, 3]), 3);
        f.forget(3);
        assert_eq!(
            f.floor(2, 3, [2, 3]),
            OLDEST,
            "a member that stopped answering may come back older"
        );
    }

    #[test]
    fn a_newer_command_waits_until_every_member_applies_its_format() {
        let f = MemberFormats::default();
        let newer = STATE_FORMAT + 1;
        f.note(2, Some(newer));
        f.note(3, None);
        let refused = f
            .admit_format(newer, "put_widget", 2, newer, [2, 3])
            .unwrap_err();
        assert!(
            refused.contains("`put_widget`") && refused.contains(&format!("format {newer}")),
            "{refused}"
        );
        f.note(3, Some(newer));
        assert!(f
            .admit_format(newer, "put_widget", 2, newer, [2, 3])
            .is_ok());
        // A member removed from the membership no longer holds it back.
        f.note(4, None);
        assert!(f
            .admit_format(newer, "put_widget", 2, newer, [2, 3])
            .is_ok());
    }

    #[test]
    fn the_commands_of_format_1_are_applied_by_the_oldest_member() {
        let f = MemberFormats::default();
        f.note(2, None);
        let cmd = Command::DeleteTenant {
            name: "t".into(),
            precondition: super::super::state::Precondition::None,
        };
        assert_eq!(cmd.format(), OLDEST);
        assert!(f.admit(&cmd, 1, &[1, 2]).is_ok());
    }

    #[test]
    fn a_membership_record_waits_for_every_member_but_the_one_it_removes() {
        let f = MemberFormats::default();
        f.note(2, Some(STATE_FORMAT));
        // Node 3 is dead: never heard from, it counts as the oldest.
        let remove = |id| Command::ChangeMembership {
            change: MembershipChange::Remove { id },
        };
        assert!(remove(3).format() > OLDEST);
        let voters = BTreeSet::from([1, 2, 3]);
        let readers = |cmd: &Command| readers(cmd, [1, 2, 3], &voters);
        assert_eq!(readers(&remove(3)), [1, 2]);
        assert_eq!(
            super::readers(&remove(2), [1, 2], &BTreeSet::from([1, 2])),
            [1, 2],
            "of two voters, the one removed votes on its removal's record"
        );
        assert_eq!(
            super::readers(&remove(4), [1, 2, 3, 4], &voters),
            [1, 2, 3],
            "a learner never votes"
        );
        assert!(
            f.admit(&remove(3), 1, &readers(&remove(3))).is_ok(),
            "removing the dead node is not held up by it"
        );
        let refused = f.admit(&remove(2), 1, &readers(&remove(2))).unwrap_err();
        assert!(refused.contains("`change_membership`"), "{refused}");
        let add = Command::ChangeMembership {
            change: MembershipChange::Add(mcpcp_proto::api::AddNodeRequest {
                id: 4,
                http_addr: "h".into(),
                grpc_addr: "g".into(),
                voter: true,
            }),
        };
        let refused = f.admit(&add, 1, &readers(&add)).unwrap_err();
        assert!(refused.contains("node(s) [3] did not answer"), "{refused}");
        assert_eq!(f.unheard(1, &readers(&add)), [3], "so it is asked");
        f.note(3, Some(STATE_FORMAT));
        assert!(f.admit(&add, 1, &readers(&add)).is_ok());
    }
}
