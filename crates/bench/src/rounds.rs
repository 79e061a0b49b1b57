//! `--rounds N`: ours and the anchors measured alternately N times per point. The figures of such a
//! point are medians over the rounds; each ratio is taken within its round (ours against the anchor
//! measured right after it) and then medianed, so a round where the host ran slow for both sides
//! does not pair with a fast round of the other side.

use std::time::Duration;

/// Median, min and max of one figure over the rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values (a figure no round measured). For an even count the median is the mean
    /// of the two middle values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_unstable_by(f64::total_cmp);
        let (min, max) = (*v.first()?, *v.last()?);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Some(Spread { median, min, max })
    }

    /// Over the rounds that measured the figure: `None` unless every round did (a figure some rounds
    /// lack is not one the rounds measured alike).
    pub fn of_each(values: impl IntoIterator<Item = Option<f64>>) -> Option<Spread> {
        let all: Option<Vec<f64>> = values.into_iter().collect();
        Spread::of(&all?)
    }
}

/// The median of durations, with the mean of the middle two for an even count.
pub fn median_duration(values: impl IntoIterator<Item = Duration>) -> Option<Duration> {
    let secs: Vec<f64> = values.into_iter().map(|d| d.as_secs_f64()).collect();
    Spread::of(&secs).map(|s| Duration::from_secs_f64(s.median))
}

/// Parses `--rounds`: 1 (one measurement of each side, as without the flag) to 100.
pub fn parse(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=100) => Ok(n),
        _ => Err("expected a whole number of rounds from 1 to 100".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_counts_take_the_middle_value_and_even_ones_the_mean_of_the_two() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Spread::of(&[4.0, 1.0, 3.0, 10.0]), Some(Spread { median: 3.5, min: 1.0, max: 10.0 }));
        assert_eq!(Spread::of(&[7.0]), Some(Spread { median: 7.0, min: 7.0, max: 7.0 }));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of_each([Some(1.0), None, Some(3.0)]), None);
        assert_eq!(Spread::of_each([Some(1.0), Some(3.0)]).map(|s| s.median), Some(2.0));
        let d = |us| Duration::from_micros(us);
        assert_eq!(median_duration([d(30), d(10), d(20)]), Some(d(20)));
        assert_eq!(median_duration([d(40), d(10), d(20), d(30)]), Some(d(25)));
    }

    #[test]
    fn rounds_are_one_to_a_hundred() {
        assert_eq!((parse("1"), parse("100"), parse("7")), (Ok(1), Ok(100), Ok(7)));
        for bad in ["0", "101", "-1", "x", "", "2.5"] {
            assert!(parse(bad).unwrap_err().contains("from 1 to 100"), "{bad}");
        }
    }
}
