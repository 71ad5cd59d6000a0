//! The values a source produces, and the table that keeps the latest one per field.

/// Microseconds since the Unix epoch on the sampling clock (the wall clock in live mode,
/// the data's own clock in simulation and replay).
pub type Micros = i64;

/// Index of a record field in the configured field list (`Config::fields`).
pub type FieldId = usize;

/// One new value for one field, as a source decoded it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalUpdate {
    pub field: FieldId,
    pub value: f64,
    pub at: Micros,
}

/// What a source sends down the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A decoded value.
    Update(SignalUpdate),
    /// The data's own clock has reached this instant with no further data before it.
    /// Drives the sampler in simulation and replay; ignored in live mode.
    Clock(Micros),
}

/// Latest value per field with the instant it arrived.
#[derive(Debug, Clone)]
pub struct SignalTable {
    latest: Vec<Option<(f64, Micros)>>,
}

impl SignalTable {
    pub fn new(fields: usize) -> Self {
        Self {
            latest: vec![None; fields],
        }
    }

    pub fn apply(&mut self, update: SignalUpdate) {
        if let Some(slot) = self.latest.get_mut(update.field) {
            *slot = Some((update.value, update.at));
        }
    }

    /// The latest value of `field` and its age at `now` (never negative).
    pub fn get(&self, field: FieldId, now: Micros) -> Option<(f64, Micros)> {
        self.latest
            .get(field)
            .copied()
            .flatten()
            .map(|(v, at)| (v, (now - at).max(0)))
    }

    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}
