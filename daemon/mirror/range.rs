//! `Range: bytes=...` for blobs (RFC 9110 §14.1.2): one range, or several
//! (answered as `multipart/byteranges`, §14.6).

/// What to send for a `Range` header.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable range (absent, another unit, or malformed: the RFC lets
    /// a server ignore it): everything, with 200.
    Full,
    /// Bytes `first..=last`, with 206.
    Part(u64, u64),
    /// Several ranges (`first..=last` each), with 206 and one part each,
    /// in the order asked; see [`MAX_PARTS`].
    Multi(Vec<(u64, u64)>),
    /// 416.
    Unsatisfiable,
}

/// Parts one response carries at most. A request with more ranges, or
/// whose ranges add up to more than the blob (overlaps: many ranges over
/// the same bytes would make a small request a huge answer), gets them
/// sorted and merged where they overlap or touch, then the nearest merged
/// until at most this many are left: every byte asked for is sent, at
/// most once. containers/image asks for at most 1,024 chunks at a time.
pub const MAX_PARTS: usize = 1024;

pub fn parse(header: &str, total: u64) -> RangeSpec {
    let Some(specs) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    let mut ranges = Vec::new();
    for spec in specs.split(',') {
        match one(spec, total) {
            One::Range(a, b) => ranges.push((a, b)),
            One::Unsatisfiable => {}
            One::Malformed => return RangeSpec::Full,
        }
    }
    match ranges.len() {
        0 => RangeSpec::Unsatisfiable,
        1 => RangeSpec::Part(ranges[0].0, ranges[0].1),
        _ => {
            let asked: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
            if ranges.len() > MAX_PARTS || asked > total {
                ranges = coalesce(ranges, MAX_PARTS);
            }
            match ranges[..] {
                [(a, b)] => RangeSpec::Part(a, b),
                _ => RangeSpec::Multi(ranges),
            }
        }
    }
}

/// The first range of a `Range` header as the client wrote it, before
/// the blob's size is known: first byte, and last byte when bounded.
/// `None` for a suffix range (`-N`: it needs the size), another unit, or
/// a malformed header.
pub fn first(header: &str) -> Option<(u64, Option<u64>)> {
    let specs = header.trim().strip_prefix("bytes=")?;
    let (a, b) = specs.split(',').next()?.trim().split_once('-')?;
    let a = a.trim().parse().ok()?;
    match b.trim() {
        "" => Some((a, None)),
        b => b.parse().ok().filter(|&b| b >= a).map(|b| (a, Some(b))),
    }
}

enum One {
    Range(u64, u64),
    Unsatisfiable,
    Malformed,
}

fn one(spec: &str, total: u64) -> One {
    let Some((a, b)) = spec.trim().split_once('-') else {
        return One::Malformed;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last `b` bytes.
        return match b.parse::<u64>() {
            Ok(0) => One::Unsatisfiable,
            Ok(_) if total == 0 => One::Unsatisfiable,
            Ok(n) => One::Range(total - n.min(total), total - 1),
            Err(_) => One::Malformed,
        };
    }
    let Ok(first) = a.parse::<u64>() else {
        return One::Malformed;
    };
    let last = if b.is_empty() {
        None
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => Some(l),
            _ => return One::Malformed,
        }
    };
    if first >= total {
        return One::Unsatisfiable;
    }
    One::Range(first, last.map_or(total - 1, |l| l.min(total - 1)))
}

/// Sorts and merges overlapping or touching ranges, then merges the
/// nearest neighbours until at most `max` are left.
fn coalesce(mut ranges: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    while merged.len() > max.max(1) {
        // The smallest gap goes; ties: the first.
        let i = (0..merged.len() - 1)
            .min_by_key(|&i| merged[i + 1].0 - merged[i].1)
            .unwrap_or(0);
        merged[i].1 = merged[i + 1].1;
        merged.remove(i + 1);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    #[test]
    fn ranges() {
        assert_eq!(parse("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse("bytes=90-500", 100), Part(90, 99));
        assert_eq!(parse("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse("bytes=-500", 100), Part(0, 99));
        assert_eq!(parse("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse("bytes=5-1", 100), Full);
        assert_eq!(parse("items=0-1", 100), Full);
        assert_eq!(parse("bytes=x-", 100), Full);
    }

    #[test]
    fn first_ranges_before_the_size_is_known() {
        assert_eq!(first("bytes=100-199"), Some((100, Some(199))));
        assert_eq!(first("bytes=5-, 0-1"), Some((5, None)));
        assert_eq!(first("bytes=-500"), None);
        assert_eq!(first("bytes=9-1"), None);
        assert_eq!(first("items=0-1"), None);
    }

    #[test]
    fn several_ranges_keep_their_order_unless_they_must_be_merged() {
        assert_eq!(parse("bytes=0-1,5-6", 100), Multi(vec![(0, 1), (5, 6)]));
        assert_eq!(
            parse("bytes=50-59, 0-9, -5", 100),
            Multi(vec![(50, 59), (0, 9), (95, 99)])
        );
        // Unsatisfiable ones are left out; one left is a plain range.
        assert_eq!(parse("bytes=0-1,200-300", 100), Part(0, 1));
        assert_eq!(parse("bytes=200-,300-", 100), Unsatisfiable);
        assert_eq!(parse("bytes=0-1,x", 100), Full);
        // Overlaps that add up to more than the blob are merged.
        assert_eq!(parse("bytes=0-99,0-99", 100), Part(0, 99));
        assert_eq!(
            parse("bytes=60-99,0-59,0-9", 100),
            Part(0, 99),
            "sorted and merged"
        );
        // Beyond the cap: the nearest merged, every byte still sent.
        let many: Vec<String> = (0..MAX_PARTS as u64 + 10)
            .map(|i| format!("{}-{}", i * 10, i * 10 + 1))
            .collect();
        let header = format!("bytes={}", many.join(","));
        match parse(&header, 1 << 20) {
            Multi(r) => {
                assert_eq!(r.len(), MAX_PARTS);
                for i in 0..MAX_PARTS as u64 + 10 {
                    let (a, b) = (i * 10, i * 10 + 1);
                    assert!(r.iter().any(|&(x, y)| x <= a && b <= y), "{a}-{b}");
                }
            }
            other => panic!("{other:?}"),
        }
    }
}
