//! The handbook cannot rot: every relative link and anchor in the README and `docs/`
//! resolves; every `vm-activator.io/*` annotation the code reads or writes, every metric
//! family it exports, every configuration key (with its default, as
//! `config/reference.yaml` has it) and every error code it can answer is named in the
//! docs; and the README's commands are the ones `.ci/run` runs. Each check is a function
//! over the text, and `each_check_fails_when_its_subject_is_removed` proves it notices.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// The markdown files of the handbook, by path relative to the repository.
#[derive(Clone)]
struct Docs {
    files: BTreeMap<PathBuf, String>,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

impl Docs {
    fn load() -> Docs {
        let mut files = BTreeMap::new();
        files.insert(PathBuf::from("README.md"), read("README.md"));
        for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "md") {
                let relative = path.strip_prefix(repo()).expect("under the repository").to_path_buf();
                files.insert(relative, std::fs::read_to_string(&path).expect("readable"));
            }
        }
        Docs { files }
    }

    /// Every file's text, one after the other.
    fn all_text(&self) -> String {
        self.files.values().cloned().collect::<Vec<_>>().join("\n")
    }

    fn file(&self, path: &str) -> &str {
        self.files.get(Path::new(path)).map(String::as_str).unwrap_or("")
    }

    fn edit(&mut self, path: &str, edit: impl FnOnce(&str) -> String) {
        let text = self.files.get_mut(Path::new(path)).expect("a handbook file");
        *text = edit(text);
    }
}

/// The lines outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and `_` kept, spaces
/// become `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors a file defines: its headings (a repeated one gets `-1`, `-2`, … as on
/// GitHub) and explicit `<a id="…">`s.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        if let Some(heading) = line.strip_prefix('#') {
            let heading = heading.trim_start_matches('#');
            if heading.starts_with(' ') {
                let base = slug(heading);
                let n = seen.entry(base.clone()).or_default();
                out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
                *n += 1;
            }
        }
        out.extend(between(line, "<a id=\"", '"'));
    }
    out
}

/// Every text in `line` that follows `open` and ends before the next `close`.
fn between<'a>(line: &'a str, open: &'a str, close: char) -> impl Iterator<Item = String> + 'a {
    line.match_indices(open).filter_map(move |(at, _)| {
        let rest = &line[at + open.len()..];
        rest.find(close).map(|end| rest[..end].to_string())
    })
}

/// The targets of the markdown links `[text](target)` outside code.
fn links(text: &str) -> Vec<String> {
    prose(text).flat_map(|line| between(line, "](", ')')).collect()
}

/// `base/relative`, with `..` and `.` resolved (no file system access).
fn join(base: &Path, relative: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for part in base.join(relative).components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Relative links to files that do not exist and anchors that no heading defines.
fn broken_links(docs: &Docs) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in &docs.files {
        for link in links(text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                file.clone()
            } else {
                join(file.parent().unwrap_or(Path::new("")), path)
            };
            let text = match docs.files.get(&target) {
                Some(text) => text.clone(),
                None if repo().join(&target).exists() => {
                    std::fs::read_to_string(repo().join(&target)).unwrap_or_default()
                }
                None => {
                    problems.push(format!(
                        "{}: link to {link}: no file {}",
                        file.display(),
                        target.display()
                    ));
                    continue;
                }
            };
            if !anchor.is_empty() && !anchors(&text).contains(anchor) {
                problems.push(format!(
                    "{}: link to {link}: {} has no heading or <a id> for #{anchor}",
                    file.display(),
                    target.display()
                ));
            }
        }
    }
    problems
}

/// Whether `word` occurs in `text` as a whole name (not as part of a longer one).
fn names(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

/// The annotations the code reads or writes that the handbook does not name. The list is
/// the parser's own (`vm::ANNOTATIONS`, checked against it by a unit test), plus any
/// `vm-activator.io/…` literal in the sources, should one be read elsewhere.
fn missing_annotations(docs: &Docs) -> Vec<String> {
    let text = docs.all_text();
    let mut wanted: BTreeSet<String> = vm_activator::vm::ANNOTATIONS
        .iter()
        .map(|name| format!("{}{name}", vm_activator::vm::ANNOTATION_PREFIX))
        .collect();
    for source in rust_sources(&repo().join("src")) {
        let code = std::fs::read_to_string(&source).unwrap_or_default();
        for (at, _) in code.match_indices("vm-activator.io/") {
            let name: String = code[at + 16..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if !name.is_empty() {
                wanted.insert(format!("vm-activator.io/{name}"));
            }
        }
    }
    wanted
        .into_iter()
        .filter(|a| !text.contains(&format!("`{a}`")))
        .collect()
}

fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The metric families the process exports that the handbook does not name in full.
fn missing_metrics(docs: &Docs) -> Vec<String> {
    let text = docs.all_text();
    let metrics = vm_activator::metrics::Metrics::new();
    let families = metrics.family_names();
    assert!(families.len() >= 10, "the registry lists its families: {families:?}");
    families.iter().filter(|name| !names(&text, name)).cloned().collect()
}

/// Every key of `config/reference.yaml` as `a.b.c` (`vms[].x` for the VMs), with its
/// value as the reference writes it.
fn reference_keys() -> BTreeMap<String, String> {
    fn scalar(value: &serde_norway::Value) -> Option<String> {
        use serde_norway::Value as V;
        match value {
            V::Null => Some("null".into()),
            V::Bool(b) => Some(b.to_string()),
            V::Number(n) => Some(n.to_string()),
            V::String(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn walk(prefix: &str, value: &serde_norway::Value, out: &mut BTreeMap<String, String>) {
        use serde_norway::Value as V;
        match value {
            V::Mapping(map) => {
                for (key, value) in map {
                    let key = key.as_str().expect("string keys");
                    let path = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            V::Sequence(items) if items.first().is_some_and(|i| i.is_mapping()) => {
                walk(&format!("{prefix}[]"), &items[0], out);
            }
            V::Sequence(items) => {
                let items: Vec<String> = items.iter().map(|i| scalar(i).expect("a list of scalars")).collect();
                out.insert(prefix.to_string(), format!("[{}]", items.join(", ")));
            }
            other => {
                out.insert(prefix.to_string(), scalar(other).expect("a scalar"));
            }
        }
    }
    let value: serde_norway::Value =
        serde_norway::from_str(&read("config/reference.yaml")).expect("reference.yaml parses");
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    out
}

/// The configuration table's rows (`| \`key\` | \`default\` | … |`), by key.
fn documented_keys(docs: &Docs) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in docs.file("docs/configuration.md").lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() >= 3 && line.starts_with("| `") {
            let key = cells[0].trim_start_matches("| ").trim_matches('`');
            out.insert(key.to_string(), cells[1].trim_matches('`').to_string());
        }
    }
    out
}

/// Keys of `config/reference.yaml` missing from docs/configuration.md's table or shown
/// there with another default, and rows for keys the reference does not have.
fn config_table_problems(docs: &Docs) -> Vec<String> {
    let reference = reference_keys();
    let documented = documented_keys(docs);
    let mut problems = Vec::new();
    for (key, value) in &reference {
        match documented.get(key) {
            None => problems.push(format!(
                "docs/configuration.md: no row for `{key}` (reference: `{value}`)"
            )),
            Some(shown) if shown != value => problems.push(format!(
                "docs/configuration.md: `{key}` shows `{shown}`, config/reference.yaml has `{value}`"
            )),
            Some(_) => {}
        }
    }
    for key in documented.keys().filter(|k| !reference.contains_key(*k)) {
        problems.push(format!(
            "docs/configuration.md: `{key}` is not in config/reference.yaml"
        ));
    }
    problems
}

/// The admin listener's codes, as its sources write them.
fn admin_codes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in ["src/server/admin.rs", "src/server/verbs.rs"] {
        let code = read(file);
        for marker in ["\"error\": \"", "code: \"", "=> \""] {
            for (at, _) in code.match_indices(marker) {
                let line_start = code[..at].rfind('\n').map_or(0, |n| n + 1);
                let line = &code[line_start..at];
                if marker == "=> \"" && !line.contains("ScaleDownRefused::") {
                    continue;
                }
                let word: String = code[at + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !word.is_empty() && code[at + marker.len() + word.len()..].starts_with('"') {
                    out.insert(word);
                }
            }
        }
    }
    out
}

/// Error codes the ingress or the admin listener can answer that docs/http.md does not
/// list.
fn missing_codes(docs: &Docs) -> Vec<String> {
    let http = docs.file("docs/http.md");
    let admin = admin_codes();
    assert!(
        admin.contains("busy") && admin.contains("forbidden"),
        "admin codes found: {admin:?}"
    );
    vm_activator::ingress::response::CODES
        .iter()
        .map(|c| c.to_string())
        .chain(admin)
        .filter(|code| !http.contains(&format!("| `{code}` |")))
        .collect()
}

/// The README's commands (the code blocks of "Run it locally") that `.ci/run` does not
/// run as written.
fn readme_commands_not_in_ci(docs: &Docs) -> Vec<String> {
    let readme = docs.file("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Run it locally"))
        .unwrap_or("");
    let ci = read(".ci/run");
    let mut commands = Vec::new();
    let mut fenced = false;
    for line in section.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if fenced && !line.trim().is_empty() {
            commands.push(line.trim().to_string());
        }
    }
    if commands.len() != 2 {
        return vec![format!(
            "README \"Run it locally\": expected its two commands, found {commands:?}"
        )];
    }
    commands
        .into_iter()
        .filter(|c| !ci.lines().any(|line| line.trim_start().starts_with(c.as_str())))
        .map(|c| format!("README command not run by .ci/run: {c}"))
        .collect()
}

#[test]
fn every_link_and_anchor_resolves() {
    let problems = broken_links(&Docs::load());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_annotation_metric_key_and_code_is_in_the_handbook() {
    let docs = Docs::load();
    assert_eq!(
        missing_annotations(&docs),
        Vec::<String>::new(),
        "annotations not in the docs"
    );
    assert_eq!(missing_metrics(&docs), Vec::<String>::new(), "metrics not in the docs");
    assert_eq!(
        config_table_problems(&docs),
        Vec::<String>::new(),
        "configuration table"
    );
    assert_eq!(
        missing_codes(&docs),
        Vec::<String>::new(),
        "error codes not in docs/http.md"
    );
}

#[test]
fn every_key_of_the_reference_is_a_key_of_the_configuration() {
    // The reference parses as the activator's own configuration (unknown keys are errors
    // there); here the other way: everything the configuration serializes is in it.
    let config = vm_activator::config::Config::from_file(&repo().join("config/reference.yaml")).expect("parses");
    let value = serde_json::to_value(&config).expect("serializes");
    let mut keys = BTreeSet::new();
    fn walk(prefix: &str, value: &serde_json::Value, keys: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, keys);
                }
            }
            serde_json::Value::Array(items) if items.first().is_some_and(|i| i.is_object()) => {
                walk(&format!("{prefix}[]"), &items[0], keys)
            }
            _ => {
                keys.insert(prefix.to_string());
            }
        }
    }
    walk("", &value, &mut keys);
    let reference = reference_keys();
    let missing: Vec<&String> = keys.iter().filter(|k| !reference.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "keys of the configuration not in config/reference.yaml: {missing:?}"
    );
}

#[test]
fn the_readme_commands_are_the_ones_ci_runs() {
    let problems = readme_commands_not_in_ci(&Docs::load());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_alert_links_its_runbook() {
    let docs = Docs::load();
    let runbooks = anchors(docs.file("docs/runbooks.md"));
    for file in [
        "deploy/monitoring/rules.yaml",
        "deploy/components/servicemonitor/prometheusrule.yaml",
    ] {
        let text = read(file);
        let alerts: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- alert: "))
            .collect();
        assert!(alerts.len() >= 4, "{file}: alerts {alerts:?}");
        let urls: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
            .map(|u| u.trim_matches('"'))
            .collect();
        assert_eq!(urls.len(), alerts.len(), "{file}: one runbook_url per alert");
        for (alert, url) in alerts.iter().zip(&urls) {
            let anchor = url.split_once("docs/runbooks.md#").map(|(_, a)| a);
            assert_eq!(
                anchor,
                Some(alert.to_lowercase().as_str()),
                "{file}: {alert}'s runbook_url {url}"
            );
            assert!(
                runbooks.contains(&alert.to_lowercase()),
                "docs/runbooks.md has no section {alert}"
            );
        }
    }
}

/// Each check, given the handbook with one thing taken out, reports exactly that.
#[test]
fn each_check_fails_when_its_subject_is_removed() {
    type Check = fn(&Docs) -> Vec<String>;
    // (what, file, text, replaced by, what the report must mention, check)
    let cases: Vec<(&str, &str, &str, &str, &str, Check)> = vec![
        (
            "a heading a link points at",
            "docs/idle.md",
            "## Keep-warm schedules",
            "## Keep warm",
            "#keep-warm-schedules",
            broken_links,
        ),
        (
            "a linked file",
            "README.md",
            "](docs/runbooks.md)",
            "](docs/run-books.md)",
            "docs/run-books.md",
            broken_links,
        ),
        (
            "an annotation",
            "docs/http.md",
            "`vm-activator.io/request-timeout`",
            "",
            "vm-activator.io/request-timeout",
            missing_annotations,
        ),
        (
            "a metric",
            "docs/operations.md",
            "vm_activator_prewarm_total",
            "",
            "vm_activator_prewarm_total",
            missing_metrics,
        ),
        (
            "a configuration key",
            "docs/configuration.md",
            "| `ingress.body_read_timeout` |",
            "",
            "ingress.body_read_timeout",
            config_table_problems,
        ),
        (
            "a configuration default",
            "docs/configuration.md",
            "| `ingress.body_read_timeout` | `15s` |",
            "| `ingress.body_read_timeout` | `30s` |",
            "ingress.body_read_timeout",
            config_table_problems,
        ),
        (
            "an error code",
            "docs/http.md",
            "| `guest_response_too_large` |",
            "",
            "guest_response_too_large",
            missing_codes,
        ),
        (
            "an admin code",
            "docs/http.md",
            "| `not_applicable` |",
            "",
            "not_applicable",
            missing_codes,
        ),
        (
            "a README command",
            "README.md",
            "deploy/local/setup.sh && cargo test\n",
            "deploy/local/setup.sh && cargo nextest run\n",
            "cargo nextest run",
            readme_commands_not_in_ci,
        ),
    ];
    let docs = Docs::load();
    for (what, file, text, replacement, mention, check) in cases {
        assert!(check(&docs).is_empty(), "{what}: the handbook as it is passes");
        let mut broken = docs.clone();
        assert!(broken.file(file).contains(text), "{what}: {file} has {text:?}");
        broken.edit(file, |t| t.replace(text, replacement));
        let problems = check(&broken);
        assert!(
            !problems.is_empty(),
            "{what}: {text:?} → {replacement:?} in {file} goes unnoticed"
        );
        assert!(
            problems.iter().any(|p| p.contains(mention)),
            "{what}: {problems:?} does not mention {mention:?}"
        );
    }
}

#[test]
fn slugs_are_github_s() {
    for (heading, anchor) in [
        ("Per-target settings: annotations", "per-target-settings-annotations"),
        ("What `cargo test` runs", "what-cargo-test-runs"),
        (
            "Three tiers of idle: stop, pause, hibernate",
            "three-tiers-of-idle-stop-pause-hibernate",
        ),
        ("VmActivatorRejecting503", "vmactivatorrejecting503"),
    ] {
        assert_eq!(slug(heading), anchor);
    }
}
