//! Small statistics and CSV helpers shared by the MNIST experiments' reports.

/// A CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break.
pub fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// One CSV record of `fields`, each quoted where needed, ending in a line break.
pub fn csv_record(fields: &[String]) -> String {
    let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    quoted.join(",") + "\n"
}

/// Student t quantile 0.975 (two-sided 95%) for `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    T.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

/// Mean and the half-width of its 95% confidence interval (Student t; NaN for one value).
pub fn mean_ci(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() == 1 {
        return Some((m, f64::NAN));
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    Some((m, t975(xs.len() - 1) * (var / n).sqrt()))
}

pub fn fmt_ci((m, ci): (f64, f64), signed: bool) -> String {
    let m = if signed {
        format!("{m:+.2}")
    } else {
        format!("{m:.2}")
    };
    if ci.is_nan() {
        m
    } else {
        format!("{m} ± {ci:.2}")
    }
}

pub fn values(cell: &[(u64, f64)]) -> Vec<f64> {
    cell.iter().map(|&(_, a)| a).collect()
}

/// `a - b` for the seeds both have: same seed, same training subset.
pub fn paired(a: &[(u64, f64)], b: &[(u64, f64)]) -> Vec<f64> {
    a.iter()
        .filter_map(|&(s, x)| b.iter().find(|&&(t, _)| t == s).map(|&(_, y)| x - y))
        .collect()
}
