//! Percentiles and medians of measurements.

/// The nearest-rank percentile: the value at index round((n - 1) * p) of the sorted values,
/// `p` in [0, 1] (0.5 is the upper median of an even count); None when there are no values.
/// Values that do not compare with themselves (NaN) are left out.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> Option<T> {
    let mut v: Vec<T> = values.iter().copied().filter(|x| x.partial_cmp(x).is_some()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable values"));
    let i = ((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    Some(v[i])
}

/// The median of the finite values (the mean of the middle two for an even count); None when
/// there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_and_medians() {
        let v = [5u64, 1, 4, 2, 3];
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 0.5), Some(3));
        assert_eq!(percentile(&v, 0.9), Some(5));
        assert_eq!(percentile(&v, 1.0), Some(5));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
        // Upper median of an even count, for Durations too.
        let d = [4, 1, 3, 2].map(Duration::from_millis);
        assert_eq!(percentile(&d, 0.5), Some(Duration::from_millis(3)));
        assert_eq!(percentile(&[1.0, f64::NAN, 3.0], 1.0), Some(3.0));
        assert_eq!(percentile(&[f64::NAN], 0.5), None);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[2.0, f64::INFINITY, 1.0, 3.0]), Some(2.0));
        assert_eq!(median(&[f64::NAN]), None);
    }
}
