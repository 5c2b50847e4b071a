//! State on the handle: raw exporters and importers, and the typed ones
//! that wrap them in the versioned envelope of [`crate::state`].

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::generation::Baton;
use crate::inner::lock;
use crate::state::{Migration, Schema, decode, encode};

impl Baton {
    /// Register a state exporter under `name`: called in this generation
    /// when a successor asks for state.
    pub fn export_raw(
        &self,
        name: &str,
        f: impl Fn() -> Result<Vec<u8>, String> + Send + Sync + 'static,
    ) {
        let mut ex = lock(&self.inner.exporters);
        ex.retain(|(n, _)| n != name);
        ex.push((name.to_owned(), Arc::new(f)));
    }

    /// The state the previous generation exported under `name` (`None` in a
    /// first generation or when it exported nothing by that name). The first
    /// call asks the old generation for its state, as late as possible: call
    /// it after everything that does not depend on state is initialized.
    ///
    /// # Errors
    /// The channel broke, or the state is over the limit.
    pub async fn import_raw(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let mut imported = self.inner.imported.lock().await;
        if imported.is_none() {
            let side = self.inner.predecessor.lock().await;
            let Some(side) = side.as_ref() else {
                return Ok(None);
            };
            *imported = Some(side.want_state(self.inner.config.state_limit).await?);
            self.inner
                .config
                .run_hook(crate::config::HandoffPoint::StateReceived);
        }
        Ok(imported.as_mut().and_then(|v| {
            v.iter()
                .position(|(n, _)| n == name)
                .map(|i| std::mem::take(&mut v[i].1))
        }))
    }
}

// Typed state: the envelope of `crate::state` over the raw exporters and
// importers above.
impl Baton {
    /// Export typed state under `name`: `f` runs in this generation when a
    /// successor asks for state (on a runtime thread: keep it quick, take a
    /// lock, clone, return).
    ///
    /// ```no_run
    /// # async fn f(baton: baton::Baton) {
    /// use std::sync::{Arc, Mutex};
    /// const SCHEMA: baton::Schema = baton::Schema::new("demo.Counter", 1);
    /// let counter = Arc::new(Mutex::new(0u64));
    /// let c = counter.clone();
    /// baton.export_state("counter", SCHEMA, move || *c.lock().unwrap());
    /// # }
    /// ```
    pub fn export_state<T, F>(&self, name: &str, schema: Schema, f: F)
    where
        T: Serialize,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.export_raw(name, move || {
            encode(schema, &f()).map_err(|e| e.to_string())
        });
    }

    /// Import typed state the previous generation exported under `name`.
    /// `Ok(None)`: first generation, or nothing exported by that name.
    ///
    /// The first import asks the old generation for its state; call it after
    /// everything that does not depend on state is initialized, and before
    /// [`ready`](Baton::ready). On error, report it with
    /// [`fail`](Baton::fail) and exit: the old generation keeps serving.
    ///
    /// # Errors
    /// As [`decode`](crate::state::decode), plus channel errors and the size limit.
    ///
    /// # Cancel safety
    /// Not cancel safe.
    pub async fn import_state<T: DeserializeOwned>(
        &self,
        name: &str,
        schema: Schema,
    ) -> Result<Option<T>, Error> {
        self.import_state_with(name, schema, None::<fn(u32, &[u8]) -> Result<T, String>>)
            .await
    }

    /// [`import_state`](Baton::import_state) with a migration hook for
    /// older schema versions: `migrate(old_version, payload)` gets the
    /// postcard payload of the old version (decode it with
    /// [`decode_payload`](crate::state::decode_payload)).
    ///
    /// # Errors
    /// As [`import_state`](Baton::import_state).
    ///
    /// # Cancel safety
    /// Not cancel safe.
    pub async fn import_state_with<T, M>(
        &self,
        name: &str,
        schema: Schema,
        migrate: Option<M>,
    ) -> Result<Option<T>, Error>
    where
        T: DeserializeOwned,
        M: Fn(u32, &[u8]) -> Result<T, String>,
    {
        let Some(bytes) = self.import_raw(name).await? else {
            return Ok(None);
        };
        let m = migrate.as_ref().map(|m| m as Migration<'_, T>);
        decode(name, schema, &bytes, m).map(Some)
    }
}
