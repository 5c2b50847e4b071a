//! OpenMetrics text checked by a real parser: PyPI `prometheus_client`'s
//! (`prometheus_client.openmetrics.parser`), run from the repository's venv
//! by `openmetrics_parse.py`. It checks what a scraper would: `# EOF` last,
//! metadata before samples, sample names that belong to their family's type
//! (`_total` for a counter, `_bucket`/`_sum`/`_count` for a histogram),
//! bucket order and `+Inf`, label and value syntax.
//!
//! A missing venv or module fails the test with a message saying to run
//! `scripts/setup-test-deps.sh`; it never skips the check.

/// The parser script (written next to the text it parses).
const PARSER_PY: &str = include_str!("openmetrics_parse.py");

/// Exit status of the script when `prometheus_client` cannot be imported.
const EXIT_NO_MODULE: i32 = 3;

/// One sample: its name (`baton_upgrades_total`), labels in the text's
/// order, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// `name{k="v",...}`, as in the text (without labels: `name`).
    pub fn series(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| {
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                format!("{k}=\"{v}\"")
            })
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// A metric family: `baton_upgrades`, type `counter`, its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub samples: Vec<Sample>,
}

/// What the parser read.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub families: Vec<Family>,
}

impl Metrics {
    /// The value of one series (`name{k="v"}`, labels as in the text).
    pub fn get(&self, series: &str) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| s.series() == series)
            .map(|s| s.value)
    }

    /// The family called `name` (a counter's name has no `_total`).
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Panic unless each `(family, type)` is present, with samples.
    pub fn expect_families(&self, expected: &[(&str, &str)]) {
        let have: Vec<(&str, &str)> = self
            .families
            .iter()
            .map(|f| (f.name.as_str(), f.kind.as_str()))
            .collect();
        for (name, kind) in expected {
            let f = self
                .family(name)
                .unwrap_or_else(|| panic!("no metric family {name}; the families: {have:?}"));
            assert_eq!(f.kind, *kind, "the type of {name}");
            assert!(!f.samples.is_empty(), "family {name} has no sample");
        }
    }
}

/// Parse `text` with `prometheus_client`'s OpenMetrics parser. `Err` is
/// the parser's complaint: the text is not valid OpenMetrics.
///
/// # Panics
///
/// If the venv python or `prometheus_client` is missing (run
/// `scripts/setup-test-deps.sh`), or the script's output is not what it
/// promises.
pub fn parse(text: &str) -> Result<Metrics, String> {
    let python = crate::apps::venv_tool("python");
    let dir = crate::TestDir::new("openmetrics");
    let script = dir.join("openmetrics_parse.py");
    let input = dir.join("metrics.txt");
    std::fs::write(&script, PARSER_PY).unwrap();
    std::fs::write(&input, text).unwrap();
    let out = crate::output(std::process::Command::new(&python).arg(&script).arg(&input))
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(EXIT_NO_MODULE) => panic!(
            "{}: {stderr}run scripts/setup-test-deps.sh (it installs prometheus_client into .venv)",
            python.display()
        ),
        _ => return Err(format!("not valid OpenMetrics ({}): {stderr}", out.status)),
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("openmetrics_parse.py printed no JSON ({e}): {stderr}"));
    let str_of = |v: &serde_json::Value| v.as_str().expect("a string").to_owned();
    let families = json
        .as_array()
        .expect("a list of families")
        .iter()
        .map(|f| Family {
            name: str_of(&f["name"]),
            kind: str_of(&f["type"]),
            samples: f["samples"]
                .as_array()
                .expect("a list of samples")
                .iter()
                .map(|s| Sample {
                    name: str_of(&s["name"]),
                    labels: s["labels"]
                        .as_array()
                        .expect("a list of labels")
                        .iter()
                        .map(|kv| (str_of(&kv[0]), str_of(&kv[1])))
                        .collect(),
                    value: str_of(&s["value"]).parse().expect("a float"),
                })
                .collect(),
        })
        .collect();
    Ok(Metrics { families })
}
