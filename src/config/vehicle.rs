//! `[vehicle]`: which car, and which session.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vehicle {
    pub id: String,
    #[serde(default = "default_session")]
    pub session_id: String,
}

pub(super) fn default_session() -> String {
    "auto".into()
}

impl Vehicle {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if self.id.is_empty() {
            return e("vehicle.id", "must not be empty".into());
        }
        if self.session_id.is_empty() {
            return e(
                "vehicle.session_id",
                "must not be empty (use \"auto\" for a new UUID at each start)".into(),
            );
        }
        Ok(())
    }
}
