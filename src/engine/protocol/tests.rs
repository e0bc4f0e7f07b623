//! The protocol's contract: a table of the transitions the README's "How
//! exactly-once is kept" describes, and properties over random event sequences.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::engine::RetryPolicy;

const SETTLE: Duration = Duration::from_secs(45);

fn rules(precheck: Precheck, resend_unknown: bool, max_attempts: u32) -> Rules {
    Rules {
        precheck,
        resend_unknown,
        settle: SETTLE,
        max_attempts,
    }
}

/// Full jitter at its ceiling: delays of 1 s, 2 s, 4 s, …
fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        first_delay: Duration::from_secs(1),
        factor: 2.0,
        max_delay: Duration::from_secs(60),
    }
}

fn machine(rules: Rules, start: Start) -> Protocol<impl FnMut() -> f64> {
    Protocol::new(rules, start, policy(rules.max_attempts).backoff(|| 1.0))
}

fn fresh() -> Start {
    Start {
        checkable: true,
        needs_check: false,
        never_sent: true,
        wait: Duration::ZERO,
    }
}

fn group(share: bool) -> Group {
    Group {
        id: "grp_1".into(),
        share_id: share.then(|| "SHARE1".into()),
        ..Group::default()
    }
}

/// An action, in a few words, for the table.
fn said(action: &Action) -> String {
    match action {
        Action::Wait(d) => format!("wait {}s", d.as_secs()),
        Action::Check { recheck: false } => "check".into(),
        Action::Check { recheck: true } => "recheck".into(),
        Action::Create => "create".into(),
        Action::Retry {
            after, needs_check, ..
        } => format!(
            "pending {}s{}",
            after.as_secs(),
            if *needs_check { " check" } else { "" }
        ),
        Action::Refetch(_) => "refetch".into(),
        Action::Finish(Final::Succeeded { obtained, .. }) => {
            format!("succeeded {}", obtained.as_str())
        }
        Action::Finish(Final::Failed { class, .. }) => format!("failed {class}"),
        Action::Finish(Final::Unknown { .. }) => "unknown".into(),
        Action::Leave => "leave".into(),
        Action::Release(_) => "release".into(),
    }
}

fn failed_check() -> Event {
    Event::Checked(Checked::Failed {
        retry_after: None,
        error: "HTTP 502".into(),
    })
}

fn timeout() -> Event {
    Event::Created(Created::Ambiguous {
        retry_after: None,
        error: "timed out".into(),
    })
}

fn too_many(secs: u64) -> Event {
    Event::Created(Created::Retry {
        retry_after: Some(Duration::from_secs(secs)),
        error: "HTTP 429".into(),
    })
}

/// Feeds `events` one by one; the actions, in words.
fn run(mut p: Protocol<impl FnMut() -> f64>, events: Vec<Event>) -> Vec<String> {
    events.into_iter().map(|e| said(&p.step(e))).collect()
}

/// A name, the rules, the job's start, the events fed and the actions expected.
type Case = (
    &'static str,
    Rules,
    Start,
    Vec<Event>,
    &'static [&'static str],
);

#[test]
fn every_transition_of_the_protocol() {
    use Event::{Checked as C, Created as K, Ready};
    let always = rules(Precheck::Always, false, 8);
    let ambiguous_only = rules(Precheck::Ambiguous, false, 8);
    let interrupted = Start {
        needs_check: true,
        never_sent: false,
        wait: Duration::from_secs(30),
        ..fresh()
    };
    let uncheckable = Start {
        checkable: false,
        ..interrupted
    };
    let rejected = K(Created::Rejected {
        status: Some(422),
        reason: "bad".into(),
    });
    let missing = C(Checked::OrderMissing("no such order".into()));
    #[rustfmt::skip]
    let table: Vec<Case> = vec![
        ("precheck absent, created", always, fresh(),
            vec![Ready, C(Checked::Absent), K(Created::Ok(group(true)))],
            &["check", "create", "succeeded created"]),
        ("precheck found", always, fresh(),
            vec![Ready, C(Checked::Found(group(true)))],
            &["check", "succeeded existing"]),
        ("precheck: order missing", always, fresh(),
            vec![Ready, missing.clone()],
            &["check", "failed order_not_found"]),
        ("no precheck asked", ambiguous_only, fresh(),
            vec![Ready, K(Created::Ok(group(true)))],
            &["create", "succeeded created"]),
        ("not checkable: no precheck", always, Start { checkable: false, ..fresh() },
            vec![Ready], &["create"]),
        ("create rejected for good", always, fresh(),
            vec![Ready, C(Checked::Absent), rejected],
            &["check", "create", "failed http_422"]),
        ("create refused (the key): released", always, fresh(),
            vec![Ready, C(Checked::Absent), K(Created::Stopped("401".into()))],
            &["check", "create", "release"]),
        ("retryable create: Retry-After, then no check", always, fresh(),
            vec![Ready, C(Checked::Absent), too_many(7), Ready, K(Created::Ok(group(true)))],
            &["check", "create", "pending 7s", "create", "succeeded created"]),
        ("ambiguous create: settle, check, recovered", ambiguous_only, fresh(),
            vec![Ready, timeout(), Ready, C(Checked::Found(group(true)))],
            &["create", "pending 45s check", "recheck", "succeeded recovered"]),
        ("ambiguous create: settle, check, re-sent", always, fresh(),
            vec![Ready, C(Checked::Absent), timeout(), Ready, C(Checked::Absent), K(Created::Ok(group(true)))],
            &["check", "create", "pending 45s check", "recheck", "create", "succeeded created"]),
        ("ambiguous with a longer Retry-After waits that", ambiguous_only, fresh(),
            vec![Ready, K(Created::Ambiguous { retry_after: Some(Duration::from_secs(90)), error: "503".into() })],
            &["create", "pending 90s check"]),
        ("retry after ambiguous still checks", ambiguous_only, fresh(),
            vec![Ready, timeout(), Ready, C(Checked::Absent), too_many(3), Ready],
            &["create", "pending 45s check", "recheck", "create", "pending 3s", "create"]),
        ("crash-interrupted: waits its check_after, then checks", always, interrupted,
            vec![Ready, Ready, C(Checked::Found(group(true)))],
            &["wait 30s", "recheck", "succeeded recovered"]),
        ("crash-interrupted, order gone", always, interrupted,
            vec![Ready, Ready, missing],
            &["wait 30s", "recheck", "failed order_not_found"]),
        ("unknown for an uncheckable row", always, uncheckable,
            vec![Ready, Ready], &["wait 30s", "unknown"]),
        ("uncheckable, resend chosen by a person", rules(Precheck::Always, true, 8), uncheckable,
            vec![Ready, Ready], &["wait 30s", "create"]),
        ("check without an answer: backoff, check again", always, fresh(),
            vec![Ready, failed_check(), Ready, C(Checked::Absent)],
            &["check", "wait 1s", "check", "create"]),
        ("check with Retry-After", always, fresh(),
            vec![Ready, C(Checked::Failed { retry_after: Some(Duration::from_secs(9)), error: "429".into() })],
            &["check", "wait 9s"]),
        ("check stopped: left as it is", always, fresh(),
            vec![Ready, C(Checked::Stopped)], &["check", "leave"]),
        ("attempts exhausted on creates", rules(Precheck::Ambiguous, false, 2), fresh(),
            vec![Ready, too_many(1), Ready, too_many(1)],
            &["create", "pending 1s", "create", "failed retries_exhausted"]),
        ("attempts exhausted on checks", rules(Precheck::Always, false, 2), fresh(),
            vec![Ready, failed_check(), Ready, failed_check()],
            &["check", "wait 1s", "check", "failed retries_exhausted"]),
        ("created without a share id: fetched again", always, fresh(),
            vec![Ready, C(Checked::Absent), K(Created::Ok(group(false))), Event::Refetched(group(false))],
            &["check", "create", "refetch", "succeeded created"]),
    ];
    for (name, rules, start, events, expected) in table {
        assert_eq!(run(machine(rules, start), events), expected, "{name}");
    }
}

#[test]
fn the_messages_say_what_happened_and_what_to_do() {
    let mut p = machine(
        rules(Precheck::Ambiguous, false, 1),
        Start {
            checkable: false,
            ..fresh()
        },
    );
    p.step(Event::Ready);
    let Action::Finish(Final::Failed { reason, .. }) = p.step(timeout()) else {
        panic!("expected a failure");
    };
    assert_eq!(
        reason,
        "gave up after 1 attempts; last error: timed out (a group may exist: retry-failed \
         checks before sending again)"
    );
    let mut p = machine(
        rules(Precheck::Always, false, 8),
        Start {
            checkable: false,
            needs_check: true,
            never_sent: false,
            wait: Duration::ZERO,
        },
    );
    let Action::Finish(Final::Unknown { reason }) = p.step(Event::Ready) else {
        panic!("expected unknown");
    };
    assert!(reason.contains("(interrupted mid-request)"), "{reason}");
    assert!(
        reason.contains("retry-failed --include-unknown"),
        "{reason}"
    );
}

/// The event a consistent world sends back for `action`, chosen by `pick`.
fn answer(action: &Action, pick: u8) -> Option<Event> {
    let pick = usize::from(pick);
    Some(match action {
        Action::Wait(_) | Action::Retry { .. } => Event::Ready,
        Action::Check { .. } => Event::Checked(match pick % 5 {
            0 => Checked::Found(group(true)),
            1 => Checked::Absent,
            2 => Checked::OrderMissing("gone".into()),
            3 => Checked::Failed {
                retry_after: None,
                error: "502".into(),
            },
            _ => Checked::Stopped,
        }),
        Action::Create => Event::Created(match pick % 6 {
            0 => Created::Ok(group(true)),
            1 => Created::Ok(group(false)),
            2 => Created::Rejected {
                status: Some(400),
                reason: "bad".into(),
            },
            3 => Created::Retry {
                retry_after: None,
                error: "429".into(),
            },
            4 => Created::Ambiguous {
                retry_after: None,
                error: "timeout".into(),
            },
            _ => Created::Stopped("401".into()),
        }),
        Action::Refetch(g) => Event::Refetched(g.clone()),
        Action::Finish(_) | Action::Leave | Action::Release(_) => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn random_worlds_keep_the_invariants(
        checkable in any::<bool>(),
        needs_check in any::<bool>(),
        never_sent in any::<bool>(),
        resend_unknown in any::<bool>(),
        always in any::<bool>(),
        max_attempts in 1u32..5,
        picks in proptest::collection::vec(any::<u8>(), 64),
    ) {
        let precheck = if always { Precheck::Always } else { Precheck::Ambiguous };
        let rules = rules(precheck, resend_unknown, max_attempts);
        let start = Start { checkable, needs_check, never_sent, wait: Duration::ZERO };
        let mut p = machine(rules, start);
        // A group may exist and no check has cleared it since.
        let mut maybe_created = needs_check;
        let mut in_flight = 0;
        let mut ends = 0;
        let mut event = Event::Ready;
        for pick in picks {
            // What the event tells the model, before the machine answers it.
            match &event {
                Event::Created(c) => {
                    in_flight -= 1;
                    if matches!(c, Created::Ambiguous { .. }) {
                        maybe_created = true;
                    }
                }
                Event::Checked(Checked::Absent) => maybe_created = false,
                _ => {}
            }
            let action = p.step(event.clone());
            match &action {
                Action::Create => {
                    prop_assert!(
                        !maybe_created || (resend_unknown && !checkable),
                        "a create while a group may exist, unchecked"
                    );
                    in_flight += 1;
                    prop_assert_eq!(in_flight, 1, "two creates in flight");
                }
                Action::Retry { after, needs_check, .. } => {
                    prop_assert_eq!(*needs_check, maybe_created, "needs_check lost or invented");
                    if matches!(event, Event::Created(Created::Ambiguous { .. })) {
                        prop_assert!(*after >= SETTLE, "checked before the settle delay");
                    }
                }
                Action::Finish(Final::Succeeded { obtained: Obtained::Recovered, .. }) => {
                    prop_assert!(maybe_created);
                }
                Action::Finish(Final::Unknown { .. }) => {
                    prop_assert!(maybe_created && !checkable && !resend_unknown);
                }
                _ => {}
            }
            match answer(&action, pick) {
                Some(next) => event = next,
                None => { ends += 1; break; }
            }
        }
        prop_assert_eq!(ends, 1, "every path ends in exactly one final action");
    }
}
