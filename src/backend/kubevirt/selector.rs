//! Which pods belong to a workload: its label selector, read from `spec.selector` or, for
//! a custom kind, from the selector string its `/scale` publishes in `status`. Pure
//! functions of the object; matching a pod's labels is kube's `Selector`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::DynamicObject;
use kube::core::{Expression, Selector};
use serde::Deserialize;

/// Which pods are the workload's: `spec.selector` (a label selector), else the selector
/// string a custom kind publishes in `status.selector` or `status.labelSelector` (its
/// scale subresource's `labelSelectorPath`). An empty selector is refused: it would take
/// every pod in the namespace.
pub(super) fn selector_of(workload: &DynamicObject) -> Result<Selector, String> {
    let spec_selector = &workload.data["spec"]["selector"];
    let selector = if spec_selector.is_object() {
        let label_selector = LabelSelector::deserialize(spec_selector)
            .map_err(|e| format!("spec.selector is not a label selector: {e}"))?;
        Selector::try_from(label_selector).map_err(|e| format!("spec.selector: {e}"))?
    } else {
        let status = &workload.data["status"];
        let text = status["selector"]
            .as_str()
            .or_else(|| status["labelSelector"].as_str())
            .ok_or("no pod selector (spec.selector, status.selector or status.labelSelector)")?;
        parse_selector(text)?
    };
    if selector.selects_all() {
        return Err("the pod selector is empty".into());
    }
    Ok(selector)
}

/// Parses a selector string as kube-apiserver prints it: `a=b,c!=d,e in (f,g),!h,i`.
fn parse_selector(text: &str) -> Result<Selector, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    let set = |values: &str| -> Result<std::collections::BTreeSet<String>, String> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("expected (values) in selector {text:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let mut expressions = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let expression = if let Some((key, values)) = term.split_once(" notin ") {
            Expression::NotIn(key.trim().into(), set(values)?)
        } else if let Some((key, values)) = term.split_once(" in ") {
            Expression::In(key.trim().into(), set(values)?)
        } else if let Some((key, value)) = term.split_once("!=") {
            Expression::NotEqual(key.trim().into(), value.trim().into())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Expression::Equal(key.trim().into(), value.trim().into())
        } else if let Some(key) = term.strip_prefix('!') {
            Expression::DoesNotExist(key.trim().into())
        } else {
            Expression::Exists(term.into())
        };
        expressions.push(expression);
    }
    Ok(expressions.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::DynamicObject;
    use kube::core::SelectorExt;
    use serde_json::json;

    use super::*;
    use crate::backend::kubevirt::workloads::api_resource;
    use crate::config::ScaleKind;

    fn workload(selector: serde_json::Value) -> DynamicObject {
        let resource = api_resource(&ScaleKind::deployment());
        let mut object = DynamicObject::new("web", &resource).within("apps");
        object.data = json!({"spec": {"replicas": 1, "selector": selector}});
        object
    }

    #[test]
    fn selectors_from_spec_or_status_and_never_empty() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let expressions = workload(
            json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}),
        );
        let selector = selector_of(&expressions).unwrap();
        assert!(selector.matches(&labels(&[("app", "web"), ("tier", "b")])));
        assert!(!selector.matches(&labels(&[("app", "web"), ("tier", "c")])));

        let mut custom = workload(serde_json::Value::Null);
        custom.data["status"] = json!({"labelSelector": "kubevirt.io/vmpool=pool,tier in (a, b),!canary"});
        let selector = selector_of(&custom).unwrap();
        assert!(selector.matches(&labels(&[("kubevirt.io/vmpool", "pool"), ("tier", "a")])));
        assert!(!selector.matches(&labels(&[
            ("kubevirt.io/vmpool", "pool"),
            ("tier", "a"),
            ("canary", "1")
        ])));

        assert!(selector_of(&workload(json!({}))).unwrap_err().contains("empty"));
        assert!(selector_of(&workload(serde_json::Value::Null))
            .unwrap_err()
            .contains("no pod selector"));
    }
}
