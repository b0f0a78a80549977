//! Access reviews for the admin verbs, decided by the API server itself: a TokenReview
//! of the caller's token, then a SubjectAccessReview of its user for the permission the
//! same action needs through the Kubernetes API — `virtctl start/stop` needs `update` on
//! `virtualmachines/start` / `stop` in `subresources.kubevirt.io` (pause:
//! `virtualmachineinstances/pause`); a workload's scaling needs `update` on its `scale`.
//! The activator's own RBAC needs `create` on `tokenreviews` and
//! `subjectaccessreviews`, nothing wider.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};

use super::targets::{targets_named, Target};
use super::KubevirtBackend;
use crate::backend::{Access, AdminVerb, BackendError};
use crate::vm::VmKey;

/// KubeVirt's API group for the VM subresources `virtctl` uses.
const KUBEVIRT_SUBRESOURCES: &str = "subresources.kubevirt.io";

impl KubevirtBackend {
    /// See the module header.
    pub(super) async fn review(&self, token: &str, key: &VmKey, verb: AdminVerb) -> Result<Access, BackendError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| self.api_error(key, "review", e))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .unwrap_or_else(|| "the API server did not authenticate the token".into());
            return Ok(Access::Unauthenticated(why));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.clone().unwrap_or_default();
        let (group, resource, subresource) = self.permission(key, verb);
        let question = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(key.namespace.clone()),
                    verb: Some("update".into()),
                    group: Some(group.clone()),
                    resource: Some(resource.clone()),
                    subresource: Some(subresource.into()),
                    name: Some(key.name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &question)
            .await
            .map_err(|e| self.api_error(key, "review", e))?;
        let status = answer.status.unwrap_or_default();
        if status.allowed {
            return Ok(Access::Allowed { user: name });
        }
        let group = if group.is_empty() { "core".to_string() } else { group };
        let reason = match status.reason.filter(|r| !r.is_empty()) {
            Some(reason) => format!("update {resource}/{subresource} in {group} denied: {reason}"),
            None => format!(
                "{name} may not update {resource}/{subresource} in {group} in namespace {}",
                key.namespace
            ),
        };
        Ok(Access::Forbidden { user: name, reason })
    }

    /// (group, resource, subresource) the verb needs on `key`'s target.
    fn permission(&self, key: &VmKey, verb: AdminVerb) -> (String, String, &'static str) {
        let found = targets_named(self, key);
        if let Some(Target::Workload { kind, .. }) = found.first() {
            let resource = &self.workloads[*kind].resource;
            return (resource.group.clone(), resource.plural.clone(), "scale");
        }
        match verb {
            AdminVerb::Start => (KUBEVIRT_SUBRESOURCES.into(), "virtualmachines".into(), "start"),
            // KubeVirt has no hibernate: the activator stops instead.
            AdminVerb::Stop | AdminVerb::Hibernate => (KUBEVIRT_SUBRESOURCES.into(), "virtualmachines".into(), "stop"),
            AdminVerb::Pause => (KUBEVIRT_SUBRESOURCES.into(), "virtualmachineinstances".into(), "pause"),
        }
    }
}
