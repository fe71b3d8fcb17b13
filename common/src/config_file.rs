//! Loading a component's config: one TOML file, then environment overrides.
//!
//! Every key can be overridden from the environment: `FRAMELINK__` then the key path with `__`
//! between levels, e.g. `FRAMELINK__KAFKA__BROKERS=10.0.0.5:9093` sets `kafka.brokers`.
//! Values are taken as text and converted for the key they set: a string key keeps them as
//! written (`FRAMELINK__DEVICE__ID=007` is `"007"`, not 7), numeric and boolean keys parse them
//! (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`). The double underscore after
//! the prefix keeps unrelated variables such as `FRAMELINK_BOOTSTRAP` (printed by
//! `scripts/kafka env`) from being read as config keys.
//!
//! Config structs use `#[serde(deny_unknown_fields)]`; errors carry the full dotted key path
//! (via serde_path_to_error), so a typo names itself: ``config key `kafka.security_protcol`:
//! unknown field``.
//!
//! [`load_validated`] is the whole path from file to a config a daemon may start with: load,
//! then the binary's own checks, whose errors are put under the file's name.

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

/// Environment prefix of config overrides (followed by `__`).
pub const ENV_PREFIX: &str = "FRAMELINK";
/// Separator between the prefix and key levels in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("config file {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

/// Loads `path` (TOML) with `FRAMELINK__...` environment overrides into `T`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    load_with_env(path, None)
}

/// A loaded and validated config `C`, with the Kafka settings its `[kafka]` table gave.
#[derive(Debug)]
pub struct Validated<C> {
    pub config: C,
    pub kafka: crate::kafka_config::KafkaSettings,
}

/// [`load`]s `path` into `T` and checks it with `validate`; an error of `validate` reads
/// `config file <path>: <error>`.
pub fn load_validated<T: DeserializeOwned, V>(path: &Path, validate: impl FnOnce(T) -> anyhow::Result<V>) -> anyhow::Result<V> {
    use anyhow::Context;
    let config: T = load(path)?;
    validate(config).with_context(|| format!("config file {}", path.display()))
}

/// [`load`], with the environment given as a map of variables instead of the process's
/// (`None`: the process's).
pub fn load_with_env<T: DeserializeOwned>(
    path: &Path,
    vars: Option<config::Map<String, String>>,
) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let env = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        // Not `try_parsing(true)`: that turns every value that looks like a number or a
        // boolean into one before the target type is known, so a string key set to `007`
        // would become "7" and `1.50` "1.5". Numeric and boolean keys parse the text
        // themselves (config's deserializer converts strings for them).
        .try_parsing(false)
        .source(vars);
    build(&text, Some(env)).map_err(|e| match e {
        ConfigFileError::Parse { message, .. } => ConfigFileError::Parse {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// Parses TOML text into `T` without environment overrides (tests, embedded defaults).
pub fn from_toml_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigFileError> {
    build(text, None)
}

fn build<T: DeserializeOwned>(text: &str, env: Option<Environment>) -> Result<T, ConfigFileError> {
    let mut builder = Config::builder().add_source(File::from_str(text, FileFormat::Toml));
    if let Some(env) = env {
        builder = builder.add_source(env);
    }
    let cfg = builder.build().map_err(|e| ConfigFileError::Parse {
        path: PathBuf::from("<text>"),
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize(cfg).map_err(|e| {
        let parent = e.path().to_string();
        let message = e.inner().to_string();
        // For an unknown field serde reports the parent's path; name the field itself.
        let key = match message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
            Some(field) if parent == "." => field.to_owned(),
            Some(field) if !parent.ends_with(field) => format!("{parent}.{field}"),
            _ => parent,
        };
        ConfigFileError::Key { key, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Top {
        name: String,
        inner: Inner,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        fps: u32,
        #[serde(default)]
        enabled: bool,
    }

    #[test]
    fn unknown_nested_key_is_named_with_its_path() {
        let e = from_toml_str::<Top>("name = \"x\"\n[inner]\nfsp = 3").unwrap_err();
        match &e {
            ConfigFileError::Key { key, .. } => assert_eq!(key, "inner.fsp"),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("config key `inner.fsp`: unknown field"), "{e}");
        let e = from_toml_str::<Top>("name = \"x\"\ncolour = 1\n[inner]").unwrap_err();
        assert!(e.to_string().contains("`colour`"), "{e}");
    }

    #[test]
    fn a_validation_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.toml");
        std::fs::write(&p, "name = \"\"\n[inner]\n").unwrap();
        let check = |t: Top| if t.name.is_empty() { anyhow::bail!("config key `name`: must not be empty") } else { Ok(t.name) };
        let e = load_validated(&p, check).unwrap_err();
        assert_eq!(format!("{e:#}"), format!("config file {}: config key `name`: must not be empty", p.display()));
        std::fs::write(&p, "name = \"x\"\n[inner]\n").unwrap();
        assert_eq!(load_validated(&p, check).unwrap(), "x");
        // Load errors are not wrapped: they name the file or the key themselves.
        std::fs::write(&p, "name = \"x\"\n[inner]\nfsp = 7\n").unwrap();
        let e = load_validated(&p, check).unwrap_err();
        assert!(format!("{e:#}").starts_with("config key `inner.fsp`: unknown field"), "{e:#}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = from_toml_str::<Top>("name = \"x\"\n[inner]\nfps = \"fast\"").unwrap_err();
        assert!(e.to_string().contains("inner.fps"), "{e}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "name = \n").unwrap();
        let e = load::<Top>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        let e = load::<Top>(&dir.path().join("missing.toml")).unwrap_err().to_string();
        assert!(e.contains("missing.toml") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "name = \"file\"\n[inner]\nfps = 5\n").unwrap();
        // SAFETY: this is the only test in the crate that touches FRAMELINK__ variables.
        unsafe {
            std::env::set_var("FRAMELINK__INNER__FPS", "30");
            std::env::set_var("FRAMELINK__INNER__ENABLED", "true");
            std::env::set_var("FRAMELINK_UNRELATED", "ignored");
        }
        let t: Top = load(&p).unwrap();
        unsafe {
            std::env::remove_var("FRAMELINK__INNER__FPS");
            std::env::remove_var("FRAMELINK__INNER__ENABLED");
            std::env::remove_var("FRAMELINK_UNRELATED");
        }
        assert_eq!(t.name, "file");
        assert_eq!(t.inner.fps, 30);
        assert!(t.inner.enabled);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Typed {
        id: String,
        password: Option<String>,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        ratio: f64,
        #[serde(default)]
        max: Option<u32>,
        #[serde(default)]
        on: bool,
        #[serde(default)]
        label: String,
        #[serde(default, deserialize_with = "crate::kafka_config::string_or_list")]
        hosts: Vec<String>,
    }

    fn load_typed(vars: &[(&str, &str)]) -> Result<Typed, ConfigFileError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "id = \"file\"\ncount = 1\nratio = 0.5\n").unwrap();
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        load_with_env(&p, Some(vars))
    }

    /// An override is text: a string key keeps it as written (leading zeros, `true`, `1e3`),
    /// while numeric and boolean keys parse it.
    #[test]
    fn environment_strings_stay_strings() {
        let t = load_typed(&[
            ("FRAMELINK__ID", "007"),
            ("FRAMELINK__PASSWORD", "0123"),
            ("FRAMELINK__LABEL", "1e3"),
            ("FRAMELINK__COUNT", "30"),
            ("FRAMELINK__RATIO", "2.5"),
            ("FRAMELINK__MAX", "640"),
            ("FRAMELINK__ON", "true"),
            ("FRAMELINK__HOSTS", "a:1,b:2"),
        ])
        .unwrap();
        assert_eq!(t.id, "007");
        assert_eq!(t.password.as_deref(), Some("0123"));
        assert_eq!(t.label, "1e3");
        assert_eq!((t.count, t.ratio, t.max, t.on), (30, 2.5, Some(640), true));
        assert_eq!(t.hosts, ["a:1", "b:2"]);
        let t = load_typed(&[("FRAMELINK__ID", "true"), ("FRAMELINK__PASSWORD", "1.50"), ("FRAMELINK__ON", "0")]).unwrap();
        assert_eq!((t.id.as_str(), t.password.as_deref(), t.on), ("true", Some("1.50"), false));
        let e = load_typed(&[("FRAMELINK__COUNT", "many")]).unwrap_err().to_string();
        assert!(e.contains("count") && e.contains("many"), "{e}");
    }
}
