//! The storage contract: checks every store implementation passes ([`super::SqliteStore`]'s tests in
//! `sqlite.rs`, [`super::PgStore`]'s in `postgres.rs`), each on a fresh, empty store.

use super::{
    Batch, CreateOutcome, EventRow, IdempotencyKey, JobQuery, JobRow, KeyRow, KeyStore, MachineRow,
    MachineStore, NewJob, StateUpdate, Store,
};

pub(super) fn job(id: &str, created: i64) -> JobRow {
    JobRow {
        id: id.into(),
        tenant: "t1".into(),
        state: "QUEUED".into(),
        terminal: false,
        workflow: "invert".into(),
        priority: 0,
        created_ms: created,
        updated_ms: created,
        ended_ms: None,
        request_id: None,
        last_seq: 1,
        labels: [("team".to_string(), "a".to_string())].into(),
        artifacts: vec!["ab".repeat(32)],
        spec: "{}".into(),
        record: "{}".into(),
    }
}

pub(super) fn event(id: &str, seq: u64) -> EventRow {
    EventRow { job_id: id.into(), seq, time_ms: 1, body: format!("{{\"n\":{seq}}}") }
}

pub(super) fn create(id: &str, created: i64, key: Option<&IdempotencyKey>) -> NewJob {
    NewJob { row: job(id, created), first_event: event(id, 1), key: key.cloned() }
}

/// Creates honour idempotency keys in the batch's order; appended events, updates and artifact references
/// land; a duplicate sequence fails the whole batch; a huge cursor clamps; deleting finished jobs returns the
/// digests left unreferenced.
pub(super) async fn batches_create_append_and_honour_keys<S: Store + ?Sized>(store: &S) {
    let key = IdempotencyKey { request_id: "r1".into(), request_hash: "h1".into() };
    let other = IdempotencyKey { request_id: "r1".into(), request_hash: "h2".into() };
    // One batch: the second create with the same key finds the first, the third conflicts.
    let batch = Batch {
        creates: vec![create("a", 1, Some(&key)), create("b", 2, Some(&key)), create("c", 3, Some(&other))],
        ..Default::default()
    };
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![
            CreateOutcome::Created,
            CreateOutcome::Existing { job_id: "a".into() },
            CreateOutcome::Conflict { job_id: "a".into() }
        ]
    );
    assert!(store.get_job("b").await.unwrap().is_none(), "nothing stored on a replay");

    let update = StateUpdate {
        id: "a".into(),
        state: "SUCCEEDED".into(),
        terminal: true,
        updated_ms: 10,
        ended_ms: Some(10),
        last_seq: 3,
        record: "{\"done\":true}".into(),
    };
    let batch = Batch {
        events: vec![event("a", 2), event("a", 3)],
        updates: vec![update.clone()],
        artifacts: vec![("a".into(), "cd".repeat(32))],
        ..Default::default()
    };
    store.commit(&batch).await.unwrap();
    let a = store.get_job("a").await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.last_seq, a.record.as_str()), ("SUCCEEDED", 3, "{\"done\":true}"));
    let evs = store.events_after("a", 1, 100).await.unwrap();
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert!(store.events_after("a", u64::MAX, 100).await.unwrap().is_empty(), "a huge cursor clamps");
    let dup = Batch { events: vec![event("a", 3)], ..Default::default() };
    assert!(store.commit(&dup).await.is_err(), "duplicate sequence refused");
    assert_eq!(store.events_after("a", 0, 100).await.unwrap().len(), 3, "a failed batch wrote nothing");
    assert!(store.unfinished_jobs().await.unwrap().is_empty());

    let (deleted, mut orphaned) = store.delete_finished_before(11, 10).await.unwrap();
    orphaned.sort();
    assert_eq!(deleted, vec!["a".to_string()]);
    assert_eq!(orphaned, vec!["ab".repeat(32), "cd".repeat(32)]);
    assert!(store.get_job("a").await.unwrap().is_none());
    assert!(store.events_after("a", 0, 10).await.unwrap().is_empty());
}

/// `list_jobs` pages newest first by `(created_ms, id)` and filters by labels and states.
pub(super) async fn list_filters_and_pages<S: Store + ?Sized>(store: &S) {
    let mut creates = Vec::new();
    for i in 0..5 {
        let mut j = create(&format!("j{i}"), i, None);
        if i % 2 == 0 {
            j.row.labels.insert("even".into(), "yes".into());
        }
        creates.push(j);
    }
    store.commit(&Batch { creates, ..Default::default() }).await.unwrap();
    let page = store.list_jobs(&JobQuery { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j4", "j3"]);
    let next = store
        .list_jobs(&JobQuery { limit: 2, before: Some((3, "j3".into())), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(next.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j2", "j1"]);
    let even = store
        .list_jobs(&JobQuery { limit: 10, labels: vec![("even".into(), "yes".into())], ..Default::default() })
        .await
        .unwrap();
    assert_eq!(even.len(), 3);
    let none = store
        .list_jobs(&JobQuery { limit: 10, states: vec!["FAILED".into()], ..Default::default() })
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// Request ids are unique per tenant, and lists filter by tenant.
pub(super) async fn request_ids_and_lists_are_per_tenant<S: Store + ?Sized>(store: &S) {
    let key = IdempotencyKey { request_id: "r1".into(), request_hash: "h1".into() };
    let mut other = create("b", 2, Some(&key));
    other.row.tenant = "t2".into();
    let batch = Batch { creates: vec![create("a", 1, Some(&key)), other], ..Default::default() };
    assert_eq!(store.commit(&batch).await.unwrap(), vec![CreateOutcome::Created, CreateOutcome::Created]);
    let again = Batch { creates: vec![create("c", 3, Some(&key))], ..Default::default() };
    assert_eq!(store.commit(&again).await.unwrap(), vec![CreateOutcome::Existing { job_id: "a".into() }]);
    let of = |t: &str| JobQuery { tenant: Some(t.into()), limit: 10, ..Default::default() };
    let ids = |rows: Vec<JobRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_jobs(&of("t1")).await.unwrap()), ["a"]);
    assert_eq!(ids(store.list_jobs(&of("t2")).await.unwrap()), ["b"]);
    assert_eq!(store.list_jobs(&JobQuery { limit: 10, ..Default::default() }).await.unwrap().len(), 2);
    assert_eq!(store.get_job("b").await.unwrap().unwrap().tenant, "t2");
}

/// A prefix names one key; a key is revoked once.
pub(super) async fn keys_are_stored_listed_and_revoked_once<S: KeyStore + ?Sized>(store: &S) {
    let key = KeyRow {
        prefix: "0a1b2c3d".into(),
        secret_sha256: "ab".repeat(32),
        tenant: "t1".into(),
        role: "viewer".into(),
        created_ms: 5,
        expires_ms: Some(10),
        revoked_ms: None,
    };
    store.insert_key(&key).await.unwrap();
    assert!(store.insert_key(&key).await.is_err(), "a prefix names one key");
    assert_eq!(store.get_key("0a1b2c3d").await.unwrap(), Some(key.clone()));
    assert!(store.revoke_key("0a1b2c3d", 7).await.unwrap());
    assert!(!store.revoke_key("0a1b2c3d", 8).await.unwrap(), "already revoked");
    assert!(!store.revoke_key("ffffffff", 8).await.unwrap());
    assert_eq!(store.list_keys().await.unwrap()[0].revoked_ms, Some(7));
}

/// `put_machine` inserts, then replaces every column but `created_ms`; `delete_machine` of an absent row is
/// no error.
pub(super) async fn machines_are_upserted_listed_and_deleted<S: MachineStore + ?Sized>(store: &S) {
    let machine = |id: &str, state: &str, created: i64, updated: i64| MachineRow {
        id: id.into(),
        kind: "runcomfy".into(),
        state: state.into(),
        created_ms: created,
        updated_ms: updated,
        body: format!("{{\"state\":\"{state}\"}}"),
    };
    store.put_machine(&machine("m2", "LAUNCHING", 2, 2)).await.unwrap();
    store.put_machine(&machine("m1", "LAUNCHING", 1, 1)).await.unwrap();
    store.put_machine(&machine("m1", "READY", 9, 5)).await.unwrap();
    let rows = store.list_machines().await.unwrap();
    assert_eq!(
        rows,
        vec![machine("m1", "READY", 1, 5), machine("m2", "LAUNCHING", 2, 2)],
        "oldest first, created kept"
    );
    store.delete_machine("m1").await.unwrap();
    store.delete_machine("m1").await.unwrap();
    assert_eq!(store.list_machines().await.unwrap(), vec![machine("m2", "LAUNCHING", 2, 2)]);
}
