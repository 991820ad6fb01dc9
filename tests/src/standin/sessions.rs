//! Sessions and the access policy, as NoETL keeps them.
//!
//! The session table maps the raw token to its user and expiry (this is the server side:
//! the gateway only ever caches `sha256(token)`). Tokens are 32 bytes from the OS CSPRNG.
//! The policy is a pure function so it is tested with plain values.

use super::idp::Identity;
use super::ids::UserId;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngCore;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The user as NoETL describes it in every auth reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// A JSON number, stable per email.
    pub user_id: UserId,
    /// The verified email.
    pub email: String,
    /// The token's `name`, else the email's local part.
    pub display_name: String,
    /// `["admin"]` for `admin@…`, `["viewer"]` for `viewer@…`, else `["user"]`.
    pub roles: Vec<String>,
}

impl User {
    /// The user for a verified identity.
    pub fn from_identity(id: &Identity) -> Self {
        let local = id.email.split('@').next().unwrap_or(&id.email);
        Self {
            user_id: UserId::for_email(&id.email),
            email: id.email.clone(),
            display_name: id.name.clone().unwrap_or_else(|| local.to_owned()),
            roles: vec![role_for(&id.email).to_owned()],
        }
    }

    /// True when the user holds the admin role.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }
}

/// The role an email gets: the demo's whole user directory.
pub fn role_for(email: &str) -> &'static str {
    let email = email.to_ascii_lowercase();
    if email.starts_with("admin@") {
        "admin"
    } else if email.starts_with("viewer@") {
        "viewer"
    } else {
        "user"
    }
}

/// The outcome of an access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// Why, in words.
    pub message: String,
}

/// The access rule: admins may do anything; users may do anything under `demo/`;
/// viewers may only `view` under `demo/` — so a gateway that asks the wrong permission
/// (`execute` for a read, `view` for a run) gets a different answer and is caught.
pub fn decide_access(user: &User, playbook_path: &str, action: &str) -> Decision {
    if user.is_admin() {
        return Decision {
            allowed: true,
            message: format!("admin may {action} {playbook_path}"),
        };
    }
    if user.roles.iter().any(|r| r == "viewer") && action != "view" {
        return Decision {
            allowed: false,
            message: format!("access denied: viewers may only view, not {action}"),
        };
    }
    if playbook_path.starts_with("demo/") {
        Decision {
            allowed: true,
            message: format!("user may {action} {playbook_path}"),
        }
    } else {
        Decision {
            allowed: false,
            message: format!("access denied: users may only {action} demo/ playbooks"),
        }
    }
}

/// One live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Who it belongs to.
    pub user: User,
    /// When it stops being valid.
    pub expires_at: DateTime<Utc>,
}

impl Session {
    /// `expires_at` as RFC 3339 UTC, the form every reply uses.
    pub fn expires_at_rfc3339(&self) -> String {
        self.expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

/// The session table. In memory: sessions die with the process, like a dev database.
#[derive(Debug)]
pub struct SessionStore {
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
}

impl SessionStore {
    /// An empty table whose sessions live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a session for `identity`; returns the raw token and the session.
    pub fn create(&self, identity: &Identity) -> (String, Session) {
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::days(1));
        let session = Session {
            user: User::from_identity(identity),
            expires_at: Utc::now() + ttl,
        };
        let token = new_session_token();
        let mut table = self.lock();
        table.retain(|_, s| s.expires_at > Utc::now());
        table.insert(token.clone(), session.clone());
        (token, session)
    }

    /// The session for `token` if it exists and has not expired.
    pub fn validate(&self, token: &str) -> Option<Session> {
        let mut table = self.lock();
        match table.get(token) {
            Some(s) if s.expires_at > Utc::now() => Some(s.clone()),
            Some(_) => {
                table.remove(token);
                None
            }
            None => None,
        }
    }

    /// Ends the session; true if there was one.
    pub fn end(&self, token: &str) -> bool {
        self.lock().remove(token).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A poisoned lock only means another handler panicked mid-update of a plain map;
        // the map itself is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// 32 bytes from the OS CSPRNG, base64url without padding (43 characters).
pub fn new_session_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(email: &str, name: Option<&str>) -> Identity {
        Identity {
            sub: "s".into(),
            email: email.into(),
            name: name.map(str::to_owned),
        }
    }

    #[test]
    fn roles_and_display_names_follow_the_email() {
        let admin = User::from_identity(&identity("admin@x.io", Some("Ada")));
        assert_eq!(admin.roles, ["admin"]);
        assert_eq!(admin.display_name, "Ada");
        let user = User::from_identity(&identity("bob@x.io", None));
        assert_eq!(user.roles, ["user"]);
        assert_eq!(user.display_name, "bob");
    }

    #[test]
    fn users_may_only_touch_demo_playbooks_and_admins_anything() {
        let user = User::from_identity(&identity("bob@x.io", None));
        let admin = User::from_identity(&identity("admin@x.io", None));
        assert!(decide_access(&user, "demo/echo", "execute").allowed);
        assert!(decide_access(&user, "demo/echo", "modify").allowed);
        assert!(!decide_access(&user, "admin/purge", "execute").allowed);
        assert!(!decide_access(&user, "demox/echo", "view").allowed);
        assert!(decide_access(&admin, "admin/purge", "execute").allowed);
    }

    #[test]
    fn viewers_may_view_demo_playbooks_but_not_execute_or_modify_them() {
        let viewer = User::from_identity(&identity("viewer@x.io", None));
        assert_eq!(viewer.roles, ["viewer"]);
        assert!(decide_access(&viewer, "demo/echo", "view").allowed);
        assert!(!decide_access(&viewer, "demo/echo", "execute").allowed);
        assert!(!decide_access(&viewer, "demo/echo", "modify").allowed);
        assert!(!decide_access(&viewer, "admin/purge", "view").allowed);
    }

    #[test]
    fn tokens_are_43_url_safe_characters_and_unique() {
        let a = new_session_token();
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(a, new_session_token());
    }

    #[test]
    fn sessions_validate_until_ended_or_expired() {
        let store = SessionStore::new(Duration::from_secs(60));
        let (t, s) = store.create(&identity("bob@x.io", None));
        assert_eq!(store.validate(&t), Some(s));
        assert!(store.end(&t));
        assert_eq!(store.validate(&t), None);

        let short = SessionStore::new(Duration::from_millis(1));
        let (t, _) = short.create(&identity("bob@x.io", None));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(short.validate(&t), None);
    }
}
