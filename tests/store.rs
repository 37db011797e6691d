//! One suite, both back ends: every test runs against an embedded SQLite file and a fresh
//! database on the real MariaDB.

mod support;

use std::sync::Arc;

use etask::model::{Attempt, DeliveryPath, ExecutionId, Overlap, Status, TaskId};
use etask::store::{self, CancelOutcome, Finish, Fire, NewTask, Store};
use serde_json::json;

fn backends(tag: &str) -> Vec<Arc<dyn Store>> {
    let dir = support::temp_dir(tag);
    let sqlite =
        store::open(&format!("sqlite:{}", dir.join("etask.db").display())).expect("sqlite");
    let mysql = store::open(&support::mysql_db(tag)).expect("mysql");
    let all: Vec<Arc<dyn Store>> = vec![Arc::new(sqlite), Arc::new(mysql)];
    for s in &all {
        assert_eq!(
            s.migrate().expect("migrate"),
            vec![1, 2, 3, 4, 5, 6],
            "{}",
            s.describe()
        );
        assert_eq!(
            s.migrate().expect("migrate twice"),
            Vec::<u32>::new(),
            "{}",
            s.describe()
        );
    }
    all
}

fn finish1(s: &dyn Store, e: ExecutionId, a: Attempt, fin: &Finish, now: i64) -> Option<Status> {
    s.finish(&[(e, a, fin.clone())], now).unwrap()[0]
}

fn once(name: &str, rid: Option<&str>) -> NewTask {
    NewTask {
        name: name.into(),
        request_id: rid.map(Into::into),
        spec: json!({"name": name, "program": {"kind": "shell", "code": "true", "secret_env": {"K": "v"}}}),
        cron: None,
        first_due_at: Some(1_000),
        deadline_ms: Some(60_000),
        path: DeliveryPath::Local,
        pool: String::new(),
    }
}

#[test]
fn create_is_idempotent_on_request_id() {
    for s in backends("idem") {
        let a = s.create_task(&once("t", Some("r-1")), 1_000).unwrap();
        let b = s.create_task(&once("t", Some("r-1")), 2_000).unwrap();
        assert!(!a.existed && b.existed, "{}", s.describe());
        assert_eq!((a.task_id, a.execution_id), (b.task_id, b.execution_id));
        assert!(a.execution_id.is_some());
        assert_eq!(
            s.list_executions(Some(a.task_id), None, 10, None)
                .unwrap()
                .len(),
            1
        );
        let task = s.get_task(a.task_id).unwrap().unwrap();
        assert_eq!(
            task.to_json()["spec"]["program"]["secret_env"]["K"],
            "******",
            "secrets are masked"
        );
    }
}

#[test]
fn claim_is_exclusive_and_attempts_fence_reports() {
    for s in backends("claim") {
        let c = s.create_task(&once("t", None), 1_000).unwrap();
        let e = c.execution_id.unwrap();
        assert!(
            s.claim_due(500, 10, "n1", DeliveryPath::Local)
                .unwrap()
                .is_empty(),
            "not due yet"
        );
        let got = s.claim_due(1_000, 10, "n1", DeliveryPath::Local).unwrap();
        assert_eq!(got.len(), 1);
        assert!(
            s.claim_due(1_000, 10, "n2", DeliveryPath::Local)
                .unwrap()
                .is_empty(),
            "claimed once only"
        );
        assert!(
            s.mark_running(&[(e, Attempt(1))], None, 1_100, 1_100)
                .unwrap()
                == 1
        );
        // Attempt 1 fails with a retry allowed.
        let fin = Finish {
            status: Some(Status::Failed),
            exit_code: Some(3),
            retry_at: Some(2_000),
            error: Some("exit 3".into()),
            ..Finish::default()
        };
        assert_eq!(
            finish1(&*s, e, Attempt(1), &fin, 1_200),
            Some(Status::RetryWait)
        );
        assert_eq!(
            finish1(&*s, e, Attempt(1), &fin, 1_200),
            None,
            "duplicate report ignored"
        );
        assert_eq!(s.promote_retries(1_500).unwrap(), 0);
        assert_eq!(s.promote_retries(2_000).unwrap(), 1);
        let got = s.claim_due(2_000, 10, "n1", DeliveryPath::Local).unwrap();
        assert_eq!(got[0].attempt, Attempt(2));
        // A late report from attempt 1 does not touch attempt 2.
        let ok = Finish {
            status: Some(Status::Succeeded),
            exit_code: Some(0),
            result: Some(json!({"a": 1}).as_object().unwrap().clone()),
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            ..Finish::default()
        };
        assert_eq!(finish1(&*s, e, Attempt(1), &ok, 2_100), None);
        assert_eq!(
            finish1(&*s, e, Attempt(2), &ok, 2_100),
            Some(Status::Succeeded)
        );
        let row = s.get_execution(e).unwrap().unwrap();
        assert_eq!(row.status, Status::Succeeded);
        assert_eq!(row.result, Some(json!({"a": 1})));
        assert_eq!(
            row.attempts
                .iter()
                .map(|a| (a.attempt, a.status))
                .collect::<Vec<_>>(),
            vec![(1, Status::Failed), (2, Status::Succeeded)]
        );
        // Terminal is final: cancel answers with the status, a new report changes nothing.
        assert_eq!(
            s.cancel(e, 3_000).unwrap(),
            CancelOutcome::AlreadyFinal(Status::Succeeded)
        );
        let fail = Finish {
            status: Some(Status::Failed),
            ..Finish::default()
        };
        assert_eq!(finish1(&*s, e, Attempt(2), &fail, 3_000), None);
        assert_eq!(
            s.outbox_due(3_000, 10).unwrap().len(),
            1,
            "terminal state queued its callback"
        );
    }
}

#[test]
fn cancel_is_idempotent_and_pending_work_is_not_claimed() {
    for s in backends("cancel") {
        let e = s
            .create_task(&once("t", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        assert!(matches!(
            s.cancel(e, 1_000).unwrap(),
            CancelOutcome::Cancelled {
                was: Status::Pending,
                ..
            }
        ));
        assert!(matches!(
            s.cancel(e, 1_001).unwrap(),
            CancelOutcome::Cancelled {
                was: Status::Cancelled,
                ..
            }
        ));
        assert!(s
            .claim_due(5_000, 10, "n", DeliveryPath::Local)
            .unwrap()
            .is_empty());
        assert_eq!(
            s.cancel(ExecutionId(999_999), 1).unwrap(),
            CancelOutcome::NotFound
        );
    }
}

fn fire(task: TaskId, expected: i64, next: Option<i64>, overlap: Overlap) -> Fire<'static> {
    Fire {
        task,
        expected,
        next,
        overlap,
        nodes: None,
        deadline_ms: None,
    }
}

fn cron_task(s: &dyn Store, first: i64) -> TaskId {
    let mut t = once("c", None);
    t.first_due_at = None;
    t.cron = Some(("* * * * * *".into(), first));
    s.create_task(&t, 1_000).unwrap().task_id
}

/// Fires at 1, 2, 3, ... seconds; returns what each fire created.
fn fire_at(s: &dyn Store, task: TaskId, sec: i64, overlap: Overlap) -> store::Fired {
    let f = fire(task, sec * 1000, Some((sec + 1) * 1000), overlap);
    s.fire_cron(&f, sec * 1000).unwrap().expect("fire won")
}

#[test]
fn forbid_skips_and_counts_fires_while_the_previous_execution_lives() {
    for s in backends("forbid") {
        let t = cron_task(&*s, 1_000);
        let first = fire_at(&*s, t, 1, Overlap::Forbid);
        assert_eq!((first.created.len(), first.skipped), (1, 0));
        // Pending, then running: both skip.
        assert_eq!(fire_at(&*s, t, 2, Overlap::Forbid).skipped, 1);
        let c = s.claim_due(2_500, 10, "n1", DeliveryPath::Local).unwrap();
        assert_eq!(c.len(), 1);
        s.mark_running(&[(c[0].id, c[0].attempt)], None, 2_600, 2_600)
            .unwrap();
        assert_eq!(fire_at(&*s, t, 3, Overlap::Forbid).skipped, 1);
        let ok = Finish {
            status: Some(Status::Succeeded),
            ..Finish::default()
        };
        finish1(&*s, c[0].id, c[0].attempt, &ok, 3_500);
        let again = fire_at(&*s, t, 4, Overlap::Forbid);
        assert_eq!(
            (again.created.len(), again.skipped),
            (1, 0),
            "{}",
            s.describe()
        );
        assert_eq!(s.get_task(t).unwrap().unwrap().skipped_fires, 2);
        assert_eq!(s.skipped_fires().unwrap(), vec![(t, "c".to_string(), 2)]);
    }
}

#[test]
fn queue_keeps_one_waiting_execution_that_is_claimed_after_the_previous_ends() {
    for s in backends("queue") {
        let t = cron_task(&*s, 1_000);
        fire_at(&*s, t, 1, Overlap::Queue);
        let c = s.claim_due(1_500, 10, "n1", DeliveryPath::Local).unwrap();
        s.mark_running(&[(c[0].id, c[0].attempt)], None, 1_600, 1_600)
            .unwrap();
        let waiting = fire_at(&*s, t, 2, Overlap::Queue);
        assert_eq!((waiting.created.len(), waiting.skipped), (1, 0));
        assert_eq!(
            fire_at(&*s, t, 3, Overlap::Queue).skipped,
            1,
            "only one may wait"
        );
        assert!(
            s.claim_due(3_500, 10, "n1", DeliveryPath::Local)
                .unwrap()
                .is_empty(),
            "the waiting execution started while the previous one runs ({})",
            s.describe()
        );
        let ok = Finish {
            status: Some(Status::Succeeded),
            ..Finish::default()
        };
        finish1(&*s, c[0].id, c[0].attempt, &ok, 3_600);
        let next = s.claim_due(3_700, 10, "n1", DeliveryPath::Local).unwrap();
        assert_eq!(
            next.iter().map(|c| c.id).collect::<Vec<_>>(),
            waiting.created
        );
    }
}

#[test]
fn replace_cancels_the_running_execution_and_starts_the_new_one() {
    for s in backends("replace") {
        let t = cron_task(&*s, 1_000);
        let first = fire_at(&*s, t, 1, Overlap::Replace);
        let c = s.claim_due(1_500, 10, "n1", DeliveryPath::Local).unwrap();
        s.mark_running(&[(c[0].id, c[0].attempt)], None, 1_600, 1_600)
            .unwrap();
        let second = fire_at(&*s, t, 2, Overlap::Replace);
        assert_eq!(
            second.cancelled,
            vec![(first.created[0], Attempt(1), Status::Running)]
        );
        assert_eq!(second.created.len(), 1);
        let old = s.get_execution(first.created[0]).unwrap().unwrap();
        assert_eq!(old.status, Status::Cancelled);
        assert!(old.error.unwrap().contains("replaced"));
        assert_eq!(
            s.claim_due(2_500, 10, "n1", DeliveryPath::Local).unwrap()[0].id,
            second.created[0]
        );
    }
}

#[test]
fn broadcast_fires_apply_the_policy_per_node() {
    for s in backends("bcastov") {
        let t = cron_task(&*s, 1_000);
        let nodes = vec!["a".to_string(), "b".to_string()];
        let mut f = fire(t, 1_000, Some(2_000), Overlap::Forbid);
        f.nodes = Some(&nodes);
        assert_eq!(s.fire_cron(&f, 1_000).unwrap().unwrap().created.len(), 2);
        // Node a's run ends; b's has not: the next fire runs on a only.
        let a = s
            .claim_due_in(1_500, 10, "a", DeliveryPath::Local, Some(""))
            .unwrap();
        let a = a
            .iter()
            .find(|c| c.pin_node.as_deref() == Some("a"))
            .unwrap();
        s.mark_running(&[(a.id, a.attempt)], None, 1_600, 1_600)
            .unwrap();
        let ok = Finish {
            status: Some(Status::Succeeded),
            ..Finish::default()
        };
        finish1(&*s, a.id, a.attempt, &ok, 1_700);
        let mut f = fire(t, 2_000, Some(3_000), Overlap::Forbid);
        f.nodes = Some(&nodes);
        let fired = s.fire_cron(&f, 2_000).unwrap().unwrap();
        assert_eq!(
            (fired.created.len(), fired.skipped),
            (1, 1),
            "{}",
            s.describe()
        );
        let e = s.get_execution(fired.created[0]).unwrap().unwrap();
        assert_eq!(e.status, Status::Pending);
    }
}

#[test]
fn schedulers_racing_on_one_mysql_fire_each_time_once_and_agree_on_forbid() {
    let url = support::mysql_db("overlaprace");
    let a = store::open(&url).unwrap();
    let b = store::open(&url).unwrap();
    a.migrate().unwrap();
    let t = cron_task(&a, 1_000);
    // Both schedulers try every fire time; the execution of the first fire never ends.
    fn race(s: &store::SqlStore, t: TaskId) -> Vec<store::Fired> {
        let mut won = Vec::new();
        for sec in 1..=20 {
            let f = fire(t, sec * 1000, Some((sec + 1) * 1000), Overlap::Forbid);
            loop {
                match s.fire_cron(&f, sec * 1000) {
                    Ok(Some(fired)) => {
                        won.push(fired);
                        break;
                    }
                    // Lost this time: go on once the winner moved the fire time on.
                    Ok(None) if s.get_task(t).unwrap().unwrap().next_fire_at > Some(sec * 1000) => {
                        break
                    }
                    Ok(None) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        won
    }
    let (wa, wb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| race(&a, t));
        let hb = sc.spawn(|| race(&b, t));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let all: Vec<_> = wa.into_iter().chain(wb).collect();
    assert_eq!(all.len(), 20, "each fire time fired exactly once");
    let created: usize = all.iter().map(|f| f.created.len()).sum();
    let skipped: u32 = all.iter().map(|f| f.skipped).sum();
    assert_eq!((created, skipped), (1, 19));
    assert_eq!(a.get_task(t).unwrap().unwrap().skipped_fires, 19);
}

#[test]
fn cron_fire_is_compare_and_set() {
    for s in backends("cron") {
        let mut t = once("c", None);
        t.first_due_at = None;
        t.cron = Some(("* * * * * *".into(), 5_000));
        let id = s.create_task(&t, 1_000).unwrap().task_id;
        assert!(s.due_cron(4_999, 10).unwrap().is_empty());
        assert_eq!(s.due_cron(5_000, 10).unwrap().len(), 1);
        let fire = fire(id, 5_000, Some(6_000), Overlap::Allow);
        assert!(s.fire_cron(&fire, 5_000).unwrap().is_some());
        assert!(
            s.fire_cron(&fire, 5_000).unwrap().is_none(),
            "second fire of the same time loses"
        );
        assert!(s.set_paused(id, true).unwrap());
        assert!(
            s.due_cron(7_000, 10).unwrap().is_empty(),
            "paused tasks do not fire"
        );
        assert!(s.set_paused(id, false).unwrap());
        assert!(s.delete_task(id, 7_000).unwrap());
        assert!(s.due_cron(7_000, 10).unwrap().is_empty());
        assert!(!s.set_paused(TaskId(id.0 + 1000), true).unwrap());
    }
}

#[test]
fn logs_are_ordered_deduplicated_and_paged() {
    for s in backends("logs") {
        let e = s
            .create_task(&once("t", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        s.append_logs(
            &[
                (e, Attempt(1), 0, "stdout", "a\n"),
                (e, Attempt(1), 1, "stderr", "b\n"),
            ],
            1,
        )
        .unwrap();
        s.append_logs(
            &[
                (e, Attempt(1), 1, "stderr", "b\n"),
                (e, Attempt(1), 2, "stdout", "ü\n"),
            ],
            2,
        )
        .unwrap();
        let all = s.logs_after(e, 0, 100).unwrap();
        assert_eq!(
            all.iter().map(|l| l.data.as_str()).collect::<Vec<_>>(),
            vec!["a\n", "b\n", "ü\n"]
        );
        let rest = s.logs_after(e, all[0].seq, 100).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].stream, "stderr");
        // `seq` numbers each execution's chunks from 1, whatever else the store holds.
        let other = s
            .create_task(&once("u", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        s.append_logs(&[(other, Attempt(1), 0, "stdout", "x\n")], 3)
            .unwrap();
        s.append_logs(&[(e, Attempt(2), 0, "stdout", "retry\n")], 4)
            .unwrap();
        let seqs = |rows: &[etask::store::LogRow]| rows.iter().map(|l| l.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&s.logs_after(other, 0, 100).unwrap()), vec![1]);
        let all = s.logs_after(e, 0, 100).unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
        assert_eq!(seqs(&s.logs_after(e, 2, 100).unwrap()), vec![3, 4]);
        // A follower continues after the last row it has, with the same numbers.
        let more = s.logs_continue(e, &all[1], 100).unwrap();
        assert_eq!(seqs(&more), vec![3, 4]);
        assert_eq!(more[1].data, "retry\n");
        assert!(s.logs_continue(e, &all[3], 100).unwrap().is_empty());
    }
}

#[test]
fn silent_executions_are_found_by_heartbeat() {
    for s in backends("silent") {
        let e = s
            .create_task(&once("t", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        s.claim_due(1_000, 10, "n1", DeliveryPath::Local).unwrap();
        assert!(s.silent(1_000, 1_000, 10).unwrap().is_empty());
        assert_eq!(s.heartbeat("n1", 5_000).unwrap(), 1);
        assert!(s.silent(5_000, 5_000, 10).unwrap().is_empty());
        let found = s.silent(5_001, 70_000, 10).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, e);
        assert!(found[0].deadline_passed);
    }
}

/// A task with its own program, so a mix-up of ids shows as another caller's program.
fn own_program(name: &str, rid: Option<&str>, code: &str) -> NewTask {
    let mut t = once(name, rid);
    t.spec = json!({"name": name, "program": {"kind": "shell", "code": code}});
    t
}

#[test]
fn concurrent_creates_with_one_name_each_get_their_own_task() {
    for s in backends("samename") {
        let got: Vec<(String, store::Created)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..16)
                .map(|t| {
                    let s = s.clone();
                    sc.spawn(move || {
                        (0..15)
                            .map(|i| {
                                let code = format!("echo {t}-{i}");
                                let c = s
                                    .create_task(&own_program("same", None, &code), 1_000)
                                    .unwrap();
                                (code, c)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut ids: Vec<_> = got.iter().map(|(_, c)| c.task_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            240,
            "{}: every caller got a task of its own",
            s.describe()
        );
        for (code, c) in &got {
            let task = s.get_task(c.task_id).unwrap().unwrap();
            assert_eq!(
                &task.to_json()["spec"]["program"]["code"],
                code,
                "{}",
                s.describe()
            );
            let e = s.get_execution(c.execution_id.unwrap()).unwrap().unwrap();
            assert_eq!(
                e.task_id,
                c.task_id,
                "{}: the execution runs the caller's task",
                s.describe()
            );
        }
    }
}

#[test]
fn concurrent_creates_with_one_request_id_make_one_task_and_one_execution() {
    for s in backends("samerid") {
        for round in 0..8 {
            let rid = format!("rid-{round}");
            let got: Vec<store::Created> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..24)
                    .map(|_| {
                        let (s, rid) = (s.clone(), rid.clone());
                        sc.spawn(move || {
                            s.create_task(&own_program("r", Some(&rid), "true"), 1_000)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap().expect("no error for a repeat"))
                    .collect()
            });
            assert_eq!(
                got.iter().filter(|c| !c.existed).count(),
                1,
                "{}",
                s.describe()
            );
            assert!(got.iter().all(|c| !c.differs));
            let first = got.iter().find(|c| !c.existed).unwrap();
            for c in &got {
                assert_eq!(
                    (c.task_id, c.execution_id),
                    (first.task_id, first.execution_id),
                    "{}",
                    s.describe()
                );
            }
            let execs = s
                .list_executions(Some(first.task_id), None, 100, None)
                .unwrap();
            assert_eq!(execs.len(), 1, "{}", s.describe());
        }
        // The same request id with another body is reported as such.
        let c = s
            .create_task(&own_program("r", Some("rid-0"), "echo other"), 2_000)
            .unwrap();
        assert!(c.existed && c.differs, "{}", s.describe());
    }
}

#[test]
fn two_stores_on_one_mysql_never_claim_the_same_execution() {
    let url = support::mysql_db("race");
    let a = store::open(&url).unwrap();
    let b = store::open(&url).unwrap();
    let (ra, rb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| a.migrate());
        let hb = sc.spawn(|| b.migrate());
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let mut applied = [ra.unwrap(), rb.unwrap()].concat();
    applied.sort();
    assert_eq!(
        applied,
        vec![1, 2, 3, 4, 5, 6],
        "each migration ran exactly once"
    );
    for i in 0..200 {
        a.create_task(&once(&format!("t{i}"), None), 1_000).unwrap();
    }
    let (ca, cb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| {
            (0..50)
                .flat_map(|_| a.claim_due(1_000, 7, "a", DeliveryPath::Local).unwrap())
                .map(|c| c.id)
                .collect::<Vec<_>>()
        });
        let hb = sc.spawn(|| {
            (0..50)
                .flat_map(|_| b.claim_due(1_000, 7, "b", DeliveryPath::Local).unwrap())
                .map(|c| c.id)
                .collect::<Vec<_>>()
        });
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let mut all = [ca.clone(), cb.clone()].concat();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "an execution was claimed twice");
    assert_eq!(
        n,
        200,
        "every execution claimed (a: {}, b: {})",
        ca.len(),
        cb.len()
    );
}

#[test]
fn one_batch_finishes_several_attempts_and_skips_stale_ones() {
    for s in backends("batch") {
        let a = s
            .create_task(&once("a", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        let b = s
            .create_task(&once("b", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        assert_eq!(
            s.claim_due(1_000, 10, "n", DeliveryPath::Local)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            s.mark_running(
                &[(a, Attempt(1)), (b, Attempt(1)), (b, Attempt(7))],
                None,
                1_001,
                1_001
            )
            .unwrap(),
            2
        );
        let ok = Finish {
            status: Some(Status::Succeeded),
            exit_code: Some(0),
            ..Finish::default()
        };
        let bad = Finish {
            status: Some(Status::Failed),
            exit_code: Some(1),
            ..Finish::default()
        };
        let got = s
            .finish(
                &[
                    (a, Attempt(1), ok.clone()),
                    (b, Attempt(2), ok),
                    (b, Attempt(1), bad),
                ],
                1_002,
            )
            .unwrap();
        assert_eq!(
            got,
            vec![Some(Status::Succeeded), None, Some(Status::Failed)],
            "{}",
            s.describe()
        );
        assert_eq!(s.get_execution(b).unwrap().unwrap().exit_code, Some(1));
    }
}

#[test]
fn purge_removes_only_old_finished_executions_and_their_logs() {
    for s in backends("purge") {
        let old = s
            .create_task(&once("old", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        let new = s
            .create_task(&once("new", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        let waiting = s
            .create_task(&once("waiting", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        let cb = s
            .create_task(&once("cb", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        s.claim_due(1_000, 3, "n", DeliveryPath::Local).unwrap(); // old, new, waiting... claims in id order
        let ok = Finish {
            status: Some(Status::Succeeded),
            ..Finish::default()
        };
        s.finish(&[(old, Attempt(1), ok.clone())], 1_500).unwrap();
        s.finish(&[(new, Attempt(1), ok.clone())], 9_000).unwrap();
        s.append_logs(
            &[
                (old, Attempt(1), 0, "stdout", "x\n"),
                (new, Attempt(1), 0, "stdout", "y\n"),
            ],
            1_500,
        )
        .unwrap();
        s.claim_due(1_000, 10, "n", DeliveryPath::Local).unwrap();
        let with_cb = Finish {
            callback_url: Some("http://127.0.0.1:1/".into()),
            ..ok
        };
        s.finish(&[(cb, Attempt(1), with_cb)], 1_500).unwrap();
        assert_eq!(s.purge(5_000, 100).unwrap(), 1, "{}", s.describe());
        assert!(s.get_execution(old).unwrap().is_none());
        assert!(s.logs_after(old, 0, 10).unwrap().is_empty());
        assert!(s.get_execution(new).unwrap().is_some());
        assert_eq!(s.logs_after(new, 0, 10).unwrap().len(), 1);
        assert!(
            s.get_execution(waiting).unwrap().is_some(),
            "a running execution is never purged"
        );
        assert!(
            s.get_execution(cb).unwrap().is_some(),
            "an execution with a pending callback is kept"
        );
    }
}

#[test]
fn each_path_claims_only_its_own_executions() {
    for s in backends("paths") {
        let mut push = once("p", None);
        push.path = DeliveryPath::Push;
        let p = s.create_task(&push, 1_000).unwrap();
        let l = s.create_task(&once("l", None), 1_000).unwrap();
        let got: Vec<_> = s
            .claim_due(1_000, 10, "push", DeliveryPath::Push)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(got, vec![p.execution_id.unwrap()], "{}", s.describe());
        let again = s.add_execution(p.task_id, 1_000, None, 1_000).unwrap();
        let got: Vec<_> = s
            .claim_due(1_000, 10, "n", DeliveryPath::Local)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(
            got,
            vec![l.execution_id.unwrap()],
            "a run-now execution keeps its task's path"
        );
        assert_eq!(
            s.claim_due(1_000, 10, "push", DeliveryPath::Push).unwrap()[0].id,
            again
        );
    }
}

#[test]
fn work_no_node_took_fails_after_the_wait() {
    for s in backends("unplaced") {
        let mut push = once("p", None);
        push.path = DeliveryPath::Push;
        push.spec = json!({"name": "p", "callback_url": "http://127.0.0.1:9/cb", "program": {"kind": "shell", "code": "true"}});
        let e = s.create_task(&push, 1_000).unwrap().execution_id.unwrap();
        let local = s
            .create_task(&once("l", None), 1_000)
            .unwrap()
            .execution_id
            .unwrap();
        assert!(
            s.fail_unplaced(DeliveryPath::Push, 500, "no node", 2_000, 10)
                .unwrap()
                .is_empty(),
            "not waiting long enough yet"
        );
        assert_eq!(
            s.fail_unplaced(DeliveryPath::Push, 1_500, "no node", 2_000, 10)
                .unwrap(),
            vec![e]
        );
        let row = s.get_execution(e).unwrap().unwrap();
        assert_eq!(
            (row.status, row.error.as_deref()),
            (Status::Failed, Some("no node"))
        );
        assert_eq!(
            s.get_execution(local).unwrap().unwrap().status,
            Status::Pending,
            "other paths untouched"
        );
        assert_eq!(
            s.outbox_due(2_000, 10).unwrap().len(),
            1,
            "its callback is queued"
        );
    }
}

#[test]
fn unstarted_dispatches_are_requeued_under_the_next_attempt() {
    for s in backends("requeue") {
        let mut t = once("a", None);
        t.path = DeliveryPath::Agent;
        let c = s.create_task(&t, 1_000).unwrap();
        let e = c.execution_id.unwrap();
        // Claimed under the placeholder node at 1_000; nothing started it.
        assert_eq!(
            s.claim_due(1_000, 10, "agent", DeliveryPath::Agent)
                .unwrap()
                .len(),
            1
        );
        assert!(s
            .unstarted(DeliveryPath::Agent, "agent", 1_000, 10)
            .unwrap()
            .is_empty());
        assert_eq!(
            s.unstarted(DeliveryPath::Agent, "agent", 5_000, 10)
                .unwrap(),
            vec![(e, Attempt(1))],
            "{}",
            s.describe()
        );
        assert!(s.requeue(e, Attempt(1), "expired", 6_000).unwrap());
        assert!(
            !s.requeue(e, Attempt(1), "expired", 6_000).unwrap(),
            "only once"
        );
        let row = s.get_execution(e).unwrap().unwrap();
        assert_eq!((row.status, row.attempt), (Status::Pending, Attempt(2)));
        assert_eq!(row.due_at, 1_000, "due time kept");
        assert_eq!(row.attempts[0].status, Status::Lost);
        assert_eq!(row.attempts[0].error.as_deref(), Some("expired"));
        // The old attempt's late reports are stale; the new one runs on the agent that starts it.
        let claimed = s
            .claim_due(7_000, 10, "agent", DeliveryPath::Agent)
            .unwrap();
        assert_eq!(claimed[0].attempt, Attempt(2));
        let fin = Finish {
            status: Some(Status::Succeeded),
            ..Finish::default()
        };
        assert_eq!(finish1(s.as_ref(), e, Attempt(1), &fin, 7_100), None);
        assert_eq!(
            s.mark_running(&[(e, Attempt(2))], Some("agent-7"), 7_200, 7_200)
                .unwrap(),
            1
        );
        // Listed by its agent's heartbeat: alive until the date given.
        assert_eq!(
            s.heartbeat_runs(&[(e, Attempt(2)), (e, Attempt(1))], 99_000)
                .unwrap(),
            1
        );
        assert!(s.silent(50_000, 50_000, 10).unwrap().is_empty());
        let row = s.get_execution(e).unwrap().unwrap();
        assert_eq!(
            (row.status, row.node.as_deref()),
            (Status::Running, Some("agent-7"))
        );
        assert!(
            s.requeue(e, Attempt(2), "x", 8_000)
                .is_ok_and(|moved| !moved),
            "a started attempt stays"
        );
    }
}

/// A TCP relay from a free local port to `target`; `cut` closes it and every relayed
/// connection.
struct Relay {
    port: u16,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(target: String) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let mut all = c.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Relay { port, conns, stop }
    }

    fn cut(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port)); // wake the accept
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_mysql_url_to_a_loopback_port_is_used_as_given_not_the_servers_socket() {
    // The driver's default would switch a 127.0.0.1 URL to the server's Unix socket after the
    // first connection: a relay on another port shows which one the store really uses.
    let url = support::mysql_db("tcp");
    let (head, db) = url.rsplit_once('/').unwrap();
    let (userpart, hostport) = head.rsplit_once('@').unwrap();
    let relay = Relay::start(hostport.to_owned());
    let via_relay = format!("{userpart}@127.0.0.1:{}/{db}", relay.port);
    let s = store::open(&via_relay).unwrap();
    s.migrate().unwrap();
    s.create_task(&once("through-the-relay", None), 1_000)
        .unwrap();
    relay.cut();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        s.ping().is_err() && s.list_tasks(None, 10, None).is_err(),
        "the store kept working with its port closed: it does not use the port of its URL"
    );
}

#[test]
fn only_attempts_recorded_not_started_are_free_of_the_retry_budget() {
    for s in backends("unstartedfree") {
        let c = s.create_task(&once("u", None), 1_000).unwrap();
        let e = c.execution_id.unwrap();
        assert_eq!(
            s.claim_due(1_000, 10, "node-a", DeliveryPath::Local)
                .unwrap()
                .len(),
            1
        );
        // Another node holds it now: the crashed node-b cannot requeue it.
        assert!(!s
            .requeue_held(e, Attempt(1), "node-b", "not started: x", 2_000)
            .unwrap());
        let msg = format!("{}node-a stopped before starting it", store::NOT_STARTED);
        assert!(s
            .requeue_held(e, Attempt(1), "node-a", &msg, 2_000)
            .unwrap());
        assert_eq!(s.unstarted_attempts(e).unwrap(), 1, "{}", s.describe());
        // A lost attempt that may have started is not free.
        assert_eq!(
            s.claim_due(3_000, 10, "node-a", DeliveryPath::Local)
                .unwrap()[0]
                .attempt,
            Attempt(2)
        );
        let fin = Finish {
            status: Some(Status::Lost),
            error: Some("node went silent".into()),
            ..Finish::default()
        };
        finish1(s.as_ref(), e, Attempt(2), &fin, 4_000);
        assert_eq!(s.unstarted_attempts(e).unwrap(), 1, "{}", s.describe());
    }
}

#[test]
fn resources_of_an_attempt_are_stored_shown_and_cleared_for_its_retry() {
    for s in backends("resources") {
        let c = s.create_task(&once("t", None), 1_000).unwrap();
        let e = c.execution_id.unwrap();
        s.claim_due(1_000, 10, "n1", DeliveryPath::Local).unwrap();
        s.mark_running(&[(e, Attempt(1))], None, 1_100, 1_100)
            .unwrap();
        let used = json!({"containment": "hybrid", "oom_killed": true, "cpu_user_ms": 12,
                          "limits": {"memory_bytes": 67108864}});
        let fin = Finish {
            status: Some(Status::Failed),
            signal: Some(9),
            resources: Some(used.clone()),
            retry_at: Some(2_000),
            ..Finish::default()
        };
        assert_eq!(
            finish1(&*s, e, Attempt(1), &fin, 1_200),
            Some(Status::RetryWait)
        );
        let row = s.get_execution(e).unwrap().unwrap();
        assert_eq!(row.resources, Some(used.clone()), "{}", s.describe());
        assert_eq!(row.to_json()["resources"], used);
        // The retry starts without the old attempt's figures.
        assert_eq!(s.promote_retries(2_000).unwrap(), 1);
        assert_eq!(s.get_execution(e).unwrap().unwrap().resources, None);
    }
}

#[test]
fn store_url_errors_never_print_the_password() {
    for url in [
        "mysql://etask:hunter2@127.0.0.1:3306",
        "mysql://etask:hunter2@127.0.0.1:notaport/etask",
        "mysql://etask:hunter2@127.0.0.1:1/etask",
    ] {
        let errors = [
            store::check_url(url).err(),
            store::open(url).err(),
            store::create_database(url).err(),
        ];
        for e in errors.into_iter().flatten() {
            let text = e.to_string();
            assert!(!text.contains("hunter2"), "{url}: {text}");
            assert!(
                text.contains("etask"),
                "{url}: the message still names the user: {text}"
            );
        }
    }
}

/// The health probe's write works on both back ends, twice in a row (nothing left behind to
/// collide with), and leaves no log chunk; a store that takes writes is not refusing them.
#[test]
fn the_write_probe_leaves_nothing_and_a_healthy_store_is_not_refusing() {
    for s in backends("probe") {
        s.probe_write().unwrap();
        s.probe_write().unwrap();
        assert!(!s.refusing_writes(), "{}", s.describe());
        assert!(
            s.logs_after(ExecutionId(0), 0, 10).unwrap().is_empty(),
            "{}",
            s.describe()
        );
    }
}
