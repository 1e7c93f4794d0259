//! The piece table's tests.

use super::*;

/// Backdates the first answer to `ms` milliseconds ago, so that what is
/// brought shows a stream's pace.
fn answered_ago(p: &Pieces, ms: u64) {
    p.state.lock().started = Some(Instant::now() - Duration::from_millis(ms));
}

#[test]
fn readers_ranges_first_then_the_rest_lowest_first() {
    let p = Pieces::new(true, false);
    let first = p.answered(Some(100 << 20), Runs::Bounded, 0, FIRST_RUN);
    assert_eq!((first.start, first.end), (0, FIRST_RUN));
    // One stream for the rest: the second connection has nothing.
    assert_eq!(p.claim(), None);
    let rest = p.finish_and_claim(first.id).unwrap();
    assert_eq!(rest.start, FIRST_RUN);
    assert!(rest.end - rest.start >= MIN_CAP);
    assert_eq!(p.claim(), None);
    // A reader far ahead: its range at once, on another connection.
    let w = p.want(90 << 20, (90 << 20) + 100);
    assert!(p.needs_connection(2, 6));
    let r = p.claim().unwrap();
    assert_eq!((r.start, r.end), (90 << 20, (90 << 20) + MIN_RUN));
    assert!(!p.needs_connection(3, 6));
    p.unwant(w);
    // Nothing is asked twice: the rest skips what is claimed.
    let mut at = rest.end;
    let mut next = p.finish_and_claim(rest.id);
    while let Some(c) = next {
        assert_eq!(c.start, at, "lowest first, no overlap");
        assert!(c.end - c.start <= MAX_RUN);
        at = if c.end == 90 << 20 { r.end } else { c.end };
        next = p.finish_and_claim(c.id);
    }
    assert_eq!(at, 100 << 20);
    assert!(!p.complete(), "the reader's range is still being fetched");
    p.finish(r.id);
    assert!(p.complete());
}

#[test]
fn a_connections_next_range_is_claimed_while_it_reads_the_end_of_its_current_one() {
    let p = Pieces::new(true, false);
    let f = p.answered(Some(100 << 20), Runs::Bounded, 0, FIRST_RUN);
    let n = p.claim_next(f.id).unwrap();
    assert_eq!(n.start, FIRST_RUN);
    assert_eq!(p.claim(), None, "still one stream");
    assert!(!p.needs_connection(1, 6));
    p.finish(f.id);
    assert_eq!(p.claim_next(n.id).unwrap().start, n.end);
}

#[test]
fn a_short_tail_goes_with_the_piece_before_it() {
    let p = Pieces::new(true, false);
    let f = p.answered(Some(256 << 20), Runs::Bounded, 0, 4 << 20);
    // 800 MiB a second on one connection: 200 MiB a quarter second.
    answered_ago(&p, 10);
    p.finish(f.id);
    let second = p.claim().unwrap();
    assert_eq!((second.start, second.end), (4 << 20, 36 << 20));
    p.finish(second.id);
    answered_ago(&p, 45);
    // 220 MiB are left; the run is 200 MiB, the 20 MiB after it go too.
    let third = p.claim().unwrap();
    assert_eq!((third.start, third.end), (36 << 20, 256 << 20));
    p.finish(third.id);
    assert!(p.complete());
}

#[test]
fn the_next_range_is_asked_for_before_its_answer_would_come_late() {
    const MIB: u64 = 1 << 20;
    let p = Pieces::new(true, false);
    let f = p.answered(Some(256 * MIB), Runs::Bounded, 0, MIB);
    p.answer_took(Duration::from_millis(100));
    answered_ago(&p, 10);
    // Until the first range is in, its next one waits for its last
    // quarter, as before.
    p.advance(f.id, MIB / 2);
    assert!(!p.ask_early(MIB / 2));
    p.advance(f.id, 3 * MIB / 4);
    let second = p.claim_next(f.id).unwrap();
    assert_eq!((second.start, second.end), (MIB, 9 * MIB));
    // The range asked ahead is not read yet: it does not halve the
    // stream's pace (75 MiB a second, not 37.5).
    let left = p.time_left_on_one().unwrap();
    assert!(left < Duration::from_secs(5), "{left:?}");
    // The first range in (1 MiB in 10 ms: 100 MiB a second); answers
    // take 100 ms, the 8 MiB of the second range 80 ms: less than two
    // answers' wait, so the third is asked for before the second's
    // answer is read; a pace measured on 1 MiB sizes it at 8 MiB.
    p.advance(f.id, MIB);
    p.finish(f.id);
    assert!(p.ask_early(8 * MIB));
    let third = p.claim_next(second.id).unwrap();
    assert_eq!((third.start, third.end), (9 * MIB, 17 * MIB));
    // Answers in a millisecond: 8 MiB is more than two answers' wait.
    p.state.lock().latency = Some(Duration::from_millis(1));
    assert!(!p.ask_early(8 * MIB));
    // Nothing to fetch beyond what readers ask: nothing early.
    let q = Pieces::new(false, false);
    let g = q.answered(Some(256 * MIB), Runs::Bounded, 0, MIB);
    q.answer_took(Duration::from_millis(100));
    q.advance(g.id, MIB);
    assert!(!q.ask_early(MIB));
}

#[test]
fn on_demand_fetches_only_what_readers_ask() {
    let p = Pieces::new(false, false);
    let first = p.answered(Some(64 << 20), Runs::Bounded, 1 << 20, 2 << 20);
    p.finish(first.id);
    assert_eq!(p.claim(), None);
    assert!(!p.needs_connection(0, 6));
    let w = p.want(10 << 20, 30 << 20);
    let c = p.claim().unwrap();
    assert_eq!(c.start, 10 << 20);
    assert!(c.end <= 30 << 20 && c.end - c.start <= (20 << 20));
    p.finish(c.id);
    p.unwant(w);
    // A reader's range over what is there and past it: a connection
    // for what is missing, though its first byte is there.
    let w = p.want(10 << 20, 40 << 20);
    assert!(p.needs_connection(0, 6));
    let more = p.claim().unwrap();
    assert_eq!(more.start, c.end);
    p.finish(more.id);
    p.unwant(w);
    assert!(!p.complete());
    // A whole read turns the rest on.
    p.fetch_rest(false);
    assert_eq!(p.claim().unwrap().start, 0);
}

#[test]
fn a_split_rest_goes_in_pieces_of_a_quarter_second_of_one_connection() {
    let p = Pieces::new(true, false);
    let f = p.answered(Some(256 << 20), Runs::Bounded, 0, 8 << 20);
    // 16 MiB in a second on one connection: pieces of 4 MiB.
    answered_ago(&p, 500);
    p.finish(f.id);
    p.split(4);
    let claims: Vec<Claimed> = (0..4).map_while(|_| p.claim()).collect();
    assert_eq!(claims.len(), 4, "four connections");
    assert_eq!(p.claim(), None);
    let mut at = 8 << 20;
    for c in &claims {
        assert_eq!(c.start, at);
        assert!((4_000_000..=4 << 20).contains(&(c.end - c.start)), "{c:?}");
        at = c.end;
    }
    let mut n = 4;
    let mut next = p.finish_and_claim(claims[0].id);
    while let Some(c) = next {
        assert_eq!(c.start, at);
        at = c.end;
        n += 1;
        next = p.finish_and_claim(c.id);
    }
    for c in &claims[1..] {
        p.finish(c.id);
    }
    assert_eq!(at, 256 << 20);
    assert!(n < 80, "{n} requests");
    assert!(p.complete());
}

#[test]
fn a_failed_range_fails_the_blob_and_frees_its_rest() {
    let p = Pieces::new(true, false);
    let f = p.answered(Some(10 << 20), Runs::Bounded, 0, FIRST_RUN);
    p.fail(f.id, 1000, "broke");
    assert_eq!(p.failed().as_deref(), Some("broke"));
    assert_eq!(p.state.lock().covered.len(), 1000);
    assert_eq!(p.claim(), None);
}

#[test]
fn a_whole_stream_is_the_only_one() {
    let p = Pieces::new(false, false);
    let f = p.answered(Some(10 << 20), Runs::Whole, 0, 10 << 20);
    let _w = p.want(5 << 20, 6 << 20);
    assert_eq!(p.claim(), None);
    assert!(!p.needs_connection(1, 6));
    p.finish(f.id);
    assert!(p.complete());
}
