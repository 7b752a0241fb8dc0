//! Canaries and shadows of the registry: a version serving a share of a
//! tenant's users (set, resized, ended, rolled back when it fails, watched
//! against the active version), and a version receiving a copy of every
//! call to compare.

use std::sync::Arc;

use super::{
    CanaryInfo, CanaryRollback, PluginRegistry, RegistryError, TenantPlugins, VersionInfo, info,
    require_version,
};
use crate::plugin::rollout::{CanaryFailing, CanaryWatch};
use crate::plugin::shadow::ShadowReport;
use crate::plugin::short;
use crate::sync::lock;

impl PluginRegistry {
    /// Has canary `version` judged afresh (its rollback was not made).
    pub fn rearm_canary(&self, tenant: &str, version: &str) {
        if let Some(plugins) = self.tenants.get(tenant)
            && let Some(canary) = plugins.state.canary.clone()
            && canary.version == version
        {
            self.watch_canary(tenant, &plugins, &canary);
        }
    }

    /// Failing canaries, as this node finds them; `None` after the first
    /// call.
    pub fn take_failing_canaries(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<CanaryFailing>> {
        lock(&self.failing_canaries).take()
    }

    /// Has `canary`'s version judged against the tenant's active one.
    pub(super) fn watch_canary(&self, tenant: &str, plugins: &TenantPlugins, canary: &CanaryInfo) {
        let (Some(baseline), Some(plugin)) =
            (plugins.active(), plugins.versions.get(&canary.version))
        else {
            return;
        };
        plugin.watch_as_canary(Some(CanaryWatch {
            baseline: baseline.clone(),
            report: self.canary_reports.clone(),
            reported: false,
        }));
        crate::metrics::plugin_canary_percent(tenant, short(&canary.version), canary.percent);
        crate::metrics::plugin_canary_watched(tenant, short(&canary.version));
    }

    /// Makes `version` serve `percent` of the tenant's users (1 to 100),
    /// or raises or lowers the share of the canary it already is.
    pub fn set_canary(
        &self,
        tenant: &str,
        version: &str,
        percent: u8,
    ) -> Result<VersionInfo, RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        require_version(&plugins, tenant, version)?;
        if !(1..=100).contains(&percent) {
            return Err(RegistryError::Conflict(
                "a canary serves 1 to 100 percent of users".to_owned(),
            ));
        }
        match plugins.state.active.as_deref() {
            None => {
                return Err(RegistryError::Conflict(format!(
                    "tenant {tenant:?} has no active version for a canary to run beside: activate one"
                )));
            }
            Some(active) if active == version => {
                return Err(RegistryError::Conflict(format!(
                    "{} is the active version already",
                    short(version)
                )));
            }
            Some(_) => {}
        }
        let canary = CanaryInfo {
            version: version.to_owned(),
            percent,
        };
        match &mut plugins.state.canary {
            Some(current) if current.version == version => {
                current.percent = percent;
                crate::metrics::plugin_canary_percent(tenant, short(version), percent);
            }
            _ => {
                plugins.end_canary(tenant, "another version became the canary");
                self.watch_canary(tenant, &plugins, &canary);
                plugins.state.canary = Some(canary);
            }
        }
        self.save(&self.store_dir.join(tenant), &plugins)?;
        tracing::info!(%tenant, version = %short(version), percent, "plugin canary set");
        Ok(info(&plugins, version))
    }

    /// Ends the tenant's canary: every user is served by the active
    /// version again.
    pub fn end_canary(&self, tenant: &str) -> Result<(), RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        if plugins.state.canary.is_none() {
            return Err(RegistryError::NotFound(format!(
                "tenant {tenant:?} has no canary"
            )));
        }
        plugins.end_canary(tenant, "asked to");
        self.save(&self.store_dir.join(tenant), &plugins)?;
        Ok(())
    }

    /// Rolls back `version`'s canary because it failed, if it still is
    /// the tenant's canary; true if it was.
    pub fn roll_back_canary(
        &self,
        tenant: &str,
        version: &str,
        reason: &str,
    ) -> Result<bool, RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        if plugins
            .state
            .canary
            .as_ref()
            .is_none_or(|c| c.version != version)
        {
            return Ok(false);
        }
        plugins.end_canary(tenant, "it failed");
        plugins.state.last_canary_rollback = Some(CanaryRollback {
            version: version.to_owned(),
            reason: reason.to_owned(),
            at_ms: crate::clock::now_micros() / 1000,
        });
        self.save(&self.store_dir.join(tenant), &plugins)?;
        crate::metrics::plugin_canary_rolled_back(tenant, short(version));
        tracing::error!(%tenant, version = %short(version), reason, "plugin canary rolled back: it failed");
        Ok(true)
    }

    /// Makes `version` the tenant's shadow, or (with `None`) ends the
    /// shadow.
    pub fn set_shadow(&self, tenant: &str, version: Option<&str>) -> Result<(), RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        let Some(version) = version else {
            if plugins.state.shadow.is_none() {
                return Err(RegistryError::NotFound(format!(
                    "tenant {tenant:?} has no shadow version"
                )));
            }
            plugins.end_shadow(tenant);
            return self
                .save(&self.store_dir.join(tenant), &plugins)
                .map_err(Into::into);
        };
        require_version(&plugins, tenant, version)?;
        if plugins.state.active.as_deref() == Some(version) {
            return Err(RegistryError::Conflict(format!(
                "{} is the active version: a shadow runs beside it",
                short(version)
            )));
        }
        if plugins.state.shadow.as_deref() != Some(version) {
            plugins.state.shadow = Some(version.to_owned());
            plugins.shadow_log = Arc::default();
        }
        self.save(&self.store_dir.join(tenant), &plugins)?;
        tracing::info!(%tenant, version = %short(version), "plugin shadow set");
        Ok(())
    }

    /// The tenant's shadow version and what it did on this node.
    pub fn shadow_report(&self, tenant: &str) -> Option<(String, ShadowReport)> {
        let plugins = self.tenants.get(tenant)?;
        let version = plugins.state.shadow.clone()?;
        Some((version, plugins.shadow_log.report()))
    }
}
