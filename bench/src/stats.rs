//! Order statistics for the benchmark samples. Everything here is pure and
//! unit-tested: the report quotes these numbers.
use serde::Serialize;

/// The value below which `p` percent of the samples lie, by the
/// nearest-rank method (p in 0..=100): the smallest sample such that at
/// least p% of all samples are <= it. None for no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The median: the middle sample, or the mean of the two middle ones.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Ratios of paired samples (same round), `num[i] / den[i]`, skipping
/// pairs whose denominator is zero.
pub fn paired_ratios(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter()
        .zip(den)
        .filter(|(_, d)| **d != 0.0)
        .map(|(n, d)| n / d)
        .collect()
}

/// Differences of paired samples (same round), `a[i] - b[i]`.
pub fn paired_diffs(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// What a table row quotes about a set of samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Self {
        let pick = |p| percentile(samples, p).unwrap_or(f64::NAN);
        Self {
            n: samples.iter().filter(|x| !x.is_nan()).count(),
            min: pick(0.0),
            p50: median(samples).unwrap_or(f64::NAN),
            p99: pick(99.0),
            max: pick(100.0),
        }
    }
}

/// A small deterministic generator (xorshift64*), so that generated rule
/// sets are the same in every run without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Rotate `items` by `round` so that each configuration runs at every
/// position across rounds (drift on a noisy machine then spreads evenly).
pub fn rotated<T: Clone>(items: &[T], round: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    let k = round % items.len();
    items[k..].iter().chain(&items[..k]).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // 200 samples: p99 is the 198th.
        let w: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&w, 99.0), Some(198.0));
        // Few samples: p99 is the maximum.
        assert_eq!(percentile(&[5.0, 1.0, 9.0], 99.0), Some(9.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_quotes_the_order_statistics() {
        let s = Summary::of(&[10.0, 30.0, 20.0, 40.0]);
        assert_eq!(s.n, 4);
        assert_eq!((s.min, s.p50, s.p99, s.max), (10.0, 25.0, 40.0, 40.0));
        assert!(Summary::of(&[]).p50.is_nan());
    }

    #[test]
    fn paired_ratios_skip_zero_denominators() {
        assert_eq!(
            paired_ratios(&[2.0, 3.0, 4.0], &[1.0, 0.0, 8.0]),
            vec![2.0, 0.5]
        );
        assert_eq!(paired_diffs(&[5.0, 7.0], &[1.0, 2.0]), vec![4.0, 5.0]);
    }

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..5).map(|_| r.below(10)).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..5).map(|_| r.below(10)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|x| *x < 10));
    }

    #[test]
    fn rotation_moves_every_item_through_every_position() {
        let items = ["a", "b", "c"];
        assert_eq!(rotated(&items, 0), ["a", "b", "c"]);
        assert_eq!(rotated(&items, 1), ["b", "c", "a"]);
        assert_eq!(rotated(&items, 4), ["b", "c", "a"]);
        assert!(rotated::<u8>(&[], 3).is_empty());
    }
}
