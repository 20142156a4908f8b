//! The VMA limit: sharing stops adding VMAs at the limit (with a warning), keeps
//! doing what costs none, and never fails. Alone in its test binary, so that the
//! process's VMA count is this test's.

mod common;

use common::*;

fn process_vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

#[test]
fn merges_stop_at_the_vma_limit() {
    // One content on every other page, zeros between: with no replicas, each
    // shared page is a VMA of its own.
    let m = GuestMem::new(2048);
    for i in 0..2048 {
        m.write(i, if i % 2 == 0 { 0xd0d0 } else { 0 });
    }
    let limit = process_vmas() + 100;
    let (s, rec) = fast_scanner(|c| {
        c.run_replicas = 0;
        c.max_vmas = Some(limit);
    });
    rec.add(&s, &m);
    let st = passes(&s, 3);
    assert!(st.vma_limited_pages > 0, "{st:?}");
    assert!(st.pool_mapped_pages > 0 && st.pool_mapped_pages < 1024, "{st:?}");
    assert_eq!(st.zero_pages, 1024, "dropping zero pages needs no VMA");
    assert!(process_vmas() <= limit, "{} VMAs, limit {limit}: {st:?}", process_vmas());
    assert_eq!(vmas(&m), 1 + st.vmas_added as usize);
    assert_eq!(st.errors, 0);
    for i in 0..2048 {
        assert!(m.holds(i, if i % 2 == 0 { 0xd0d0 } else { 0 }));
    }

    // Giving the range back to anonymous memory frees its VMAs; with replicas the
    // same content needs few.
    s.set_config(tps::Config { run_replicas: 64, ..s.config() });
    rec.at(0).discard(m.addr, m.len()).unwrap();
    assert_eq!(vmas(&m), 1);
    for i in 0..2048 {
        rec.write(0, || m.write(i, 0xd0d0));
    }
    let st = passes(&s, 3);
    assert_eq!(st.pool_mapped_pages, 2048, "{st:?}");
    assert!(process_vmas() <= limit);
}
