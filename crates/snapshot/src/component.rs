//! The one saved-state contract, as a VM uses it: every stateful component implements
//! [`Snapshottable`] and is registered under an id; a [`Registry`] saves, checks and restores
//! them all, so a new device registers itself instead of needing edits in the VM's freeze and
//! in-place restore. Saved state is [`ComponentStates`]: each component's encoding version and
//! bytes, keyed by id (one snapshot section holds the map).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Snapshottable;

/// One component's saved state: the version of its encoding and the encoded bytes (postcard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentState {
    /// The encoding's version ([`Snapshottable::VERSION`] when saved).
    pub version: u32,
    /// The state, encoded.
    pub bytes: Vec<u8>,
}

/// Every component's saved state, by component id.
pub type ComponentStates = BTreeMap<String, ComponentState>;

/// Why a component's state could not be saved, checked or restored.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// The component refused or failed.
    #[error("{id}: {reason}")]
    Component {
        /// The component.
        id: String,
        /// Why.
        reason: String,
    },
    /// The saved state has no entry for a registered component.
    #[error("the saved state has no state for component {0}")]
    Missing(String),
    /// The saved state has an entry for a component this VM does not have.
    #[error("the saved state has state for component {0}, which this VM does not have")]
    Unknown(String),
    /// The entry is of an encoding version this build cannot read.
    #[error("{id}: state version {found} (this build reads {expected})")]
    Version {
        /// The component.
        id: String,
        /// Version in the state.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
}

/// Encodes `state` as component state.
pub fn encode<T: Serialize>(
    id: &str,
    version: u32,
    state: &T,
) -> Result<ComponentState, ComponentError> {
    let bytes = postcard::to_stdvec(state).map_err(|e| ComponentError::Component {
        id: id.into(),
        reason: format!("cannot encode its state: {e}"),
    })?;
    Ok(ComponentState { version, bytes })
}

/// Decodes component `id`'s state from `states`, checking its version.
pub fn decode<T: serde::de::DeserializeOwned>(
    states: &ComponentStates,
    id: &str,
    version: u32,
) -> Result<T, ComponentError> {
    let s = states
        .get(id)
        .ok_or_else(|| ComponentError::Missing(id.into()))?;
    if s.version != version {
        return Err(ComponentError::Version {
            id: id.into(),
            found: s.version,
            expected: version,
        });
    }
    postcard::from_bytes(&s.bytes).map_err(|e| ComponentError::Component {
        id: id.into(),
        reason: format!("its state does not decode: {e}"),
    })
}

/// The object-safe side of [`Snapshottable`], what a [`Registry`] holds.
pub trait Component: Send + Sync {
    /// The id its state is kept under.
    fn id(&self) -> &str;
    /// Saves its state.
    fn save_state(&self) -> Result<ComponentState, ComponentError>;
    /// Checks `state` could be restored (nothing changes).
    fn check_state(&self, state: &ComponentState) -> Result<(), ComponentError>;
    /// Restores `state`.
    fn restore_state(&self, state: &ComponentState) -> Result<(), ComponentError>;
}

/// A [`Snapshottable`] registered under an id.
pub struct Registered<T> {
    id: String,
    inner: T,
}

impl<T> Registered<T> {
    /// `inner` under `id`.
    pub fn new(id: impl Into<String>, inner: T) -> Self {
        Self {
            id: id.into(),
            inner,
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> ComponentError {
        ComponentError::Component {
            id: self.id.clone(),
            reason: e.to_string(),
        }
    }

    fn decode<S: serde::de::DeserializeOwned>(
        &self,
        state: &ComponentState,
        version: u32,
    ) -> Result<S, ComponentError> {
        let mut one = ComponentStates::new();
        one.insert(self.id.clone(), state.clone());
        decode(&one, &self.id, version)
    }
}

impl<T: Snapshottable + Send + Sync> Component for Registered<T> {
    fn id(&self) -> &str {
        &self.id
    }

    fn save_state(&self) -> Result<ComponentState, ComponentError> {
        let s = self.inner.save().map_err(|e| self.fail(e))?;
        encode(&self.id, T::VERSION, &s)
    }

    fn check_state(&self, state: &ComponentState) -> Result<(), ComponentError> {
        let s: T::State = self.decode(state, T::VERSION)?;
        self.inner.check(&s).map_err(|e| self.fail(e))
    }

    fn restore_state(&self, state: &ComponentState) -> Result<(), ComponentError> {
        let s: T::State = self.decode(state, T::VERSION)?;
        self.inner.restore(s).map_err(|e| self.fail(e))
    }
}

/// A VM's stateful components.
#[derive(Default)]
pub struct Registry {
    components: Vec<Box<dyn Component>>,
}

impl Registry {
    /// Adds `c`; its id must be new.
    pub fn register(&mut self, c: Box<dyn Component>) {
        debug_assert!(
            self.components.iter().all(|o| o.id() != c.id()),
            "component {} registered twice",
            c.id()
        );
        self.components.push(c);
    }

    /// The registered ids, in registration order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.components.iter().map(|c| c.id())
    }

    /// Saves every component (the VM is paused).
    pub fn save_all(&self) -> Result<ComponentStates, ComponentError> {
        self.components
            .iter()
            .map(|c| Ok((c.id().to_string(), c.save_state()?)))
            .collect()
    }

    /// Checks `states` holds exactly this registry's components, each restorable.
    pub fn check_all(&self, states: &ComponentStates) -> Result<(), ComponentError> {
        if let Some(id) = states
            .keys()
            .find(|id| self.ids().all(|r| r != id.as_str()))
        {
            return Err(ComponentError::Unknown(id.clone()));
        }
        for c in &self.components {
            let s = states
                .get(c.id())
                .ok_or_else(|| ComponentError::Missing(c.id().into()))?;
            c.check_state(s)?;
        }
        Ok(())
    }

    /// Restores every component, after checking them all (the VM is paused).
    pub fn restore_all(&self, states: &ComponentStates) -> Result<(), ComponentError> {
        self.check_all(states)?;
        for c in &self.components {
            if let Some(s) = states.get(c.id()) {
                c.restore_state(s)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Counter(Mutex<u32>);

    #[derive(Debug, thiserror::Error)]
    #[error("too big: {0}")]
    struct TooBig(u32);

    impl Snapshottable for Counter {
        type State = u32;
        type Error = TooBig;
        const VERSION: u32 = 1;
        fn save(&self) -> Result<u32, TooBig> {
            Ok(*self.0.lock().unwrap())
        }
        fn check(&self, s: &u32) -> Result<(), TooBig> {
            if *s > 100 { Err(TooBig(*s)) } else { Ok(()) }
        }
        fn restore(&self, s: u32) -> Result<(), TooBig> {
            *self.0.lock().unwrap() = s;
            Ok(())
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        let c = Counter::default();
        *c.0.lock().unwrap() = 7;
        r.register(Box::new(Registered::new("a", c)));
        r.register(Box::new(Registered::new("b", Counter::default())));
        r
    }

    #[test]
    fn every_component_saves_and_restores_under_its_id() {
        let r = registry();
        let saved = r.save_all().unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(decode::<u32>(&saved, "a", 1).unwrap(), 7);
        let r2 = registry();
        let mut other = saved.clone();
        other.insert("b".into(), encode("b", 1, &42u32).unwrap());
        r2.restore_all(&other).unwrap();
        assert_eq!(decode::<u32>(&r2.save_all().unwrap(), "b", 1).unwrap(), 42);
    }

    #[test]
    fn a_bad_state_is_refused_before_anything_changes() {
        let r = registry();
        let good = r.save_all().unwrap();
        let mut missing = good.clone();
        missing.remove("b");
        assert!(matches!(r.check_all(&missing), Err(ComponentError::Missing(id)) if id == "b"));
        let mut extra = good.clone();
        extra.insert("net0".into(), encode("net0", 1, &1u32).unwrap());
        assert!(matches!(r.check_all(&extra), Err(ComponentError::Unknown(id)) if id == "net0"));
        let mut newer = good.clone();
        newer.get_mut("a").unwrap().version = 2;
        assert!(matches!(
            r.check_all(&newer),
            Err(ComponentError::Version { .. })
        ));
        // "b" is refused by the component itself: "a" must not have been restored either.
        let mut big = good.clone();
        big.insert("a".into(), encode("a", 1, &50u32).unwrap());
        big.insert("b".into(), encode("b", 1, &500u32).unwrap());
        let e = r.restore_all(&big).unwrap_err();
        assert!(e.to_string().contains("too big"), "{e}");
        assert_eq!(decode::<u32>(&r.save_all().unwrap(), "a", 1).unwrap(), 7);
        let mut garbage = good;
        garbage.get_mut("a").unwrap().bytes = vec![0xff; 3];
        assert!(r.check_all(&garbage).is_err());
    }
}
