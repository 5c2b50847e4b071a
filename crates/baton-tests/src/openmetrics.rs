//! A checker for the OpenMetrics text format (what `promtool check metrics`
//! would say, for machines without promtool).

/// Check OpenMetrics text line by line: `# HELP`/`# TYPE` declared before
/// samples, sample names belong to the declared family, values are numbers,
/// `# EOF` last.
pub fn check(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("does not end with # EOF".into());
    }
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            if ![
                "counter",
                "gauge",
                "histogram",
                "summary",
                "unknown",
                "info",
                "stateset",
                "gaugehistogram",
            ]
            .contains(&ty)
            {
                return Err(format!("unknown type: {line}"));
            }
            families.push((name.to_owned(), ty.to_owned()));
        } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
        } else if line.starts_with('#') {
            return Err(format!("unexpected comment: {line}"));
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().map_err(|_| format!("bad value: {line}"))?,
            };
            let name = series.split('{').next().unwrap_or_default();
            if series.contains('{') && !series.ends_with('}') {
                return Err(format!("bad labels: {line}"));
            }
            let (fam, ty) = families
                .last()
                .ok_or(format!("sample before TYPE: {line}"))?;
            let ok = match ty.as_str() {
                "counter" => name == format!("{fam}_total") || name == format!("{fam}_created"),
                "histogram" => [
                    format!("{fam}_bucket"),
                    format!("{fam}_sum"),
                    format!("{fam}_count"),
                    format!("{fam}_created"),
                ]
                .contains(&name.to_owned()),
                _ => name == fam,
            };
            if !ok {
                return Err(format!("sample {name} does not belong to {fam} ({ty})"));
            }
            samples.push((series.to_owned(), v));
        }
    }
    Ok(samples)
}

/// When the machine has `promtool`, it must accept `text` too (else only
/// [`check`] has judged it; said on stderr).
pub fn check_with_promtool(text: &str) {
    let Some(promtool) = crate::apps::which("promtool") else {
        eprintln!("promtool not installed: checked with the built-in OpenMetrics parser only");
        return;
    };
    let dir = crate::TestDir::new("promtool");
    let f = dir.join("m.txt");
    std::fs::write(&f, text).unwrap();
    let out = crate::output(
        std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&f).unwrap()),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
