//! Static AWS profiles: `~/.aws/credentials` and `~/.aws/config` (or the
//! files `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` name), profile
//! `AWS_PROFILE` or `default`, as the AWS CLI reads them: keys, session
//! token, region and `endpoint_url`. Variables in the environment win over
//! the files. Profiles that get their keys elsewhere (SSO, `role_arn`,
//! `credential_process`) are refused with the way around.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{RemoteError, Result};

/// A profile's settings, as `object_store` names them (`aws_access_key_id`,
/// `aws_secret_access_key`, `aws_session_token`, `aws_region`,
/// `aws_endpoint`), leaving out what the environment sets.
pub(crate) fn settings(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>> {
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| env(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)));
    let named = env("AWS_PROFILE");
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let mut found = BTreeMap::new();
    let mut any = false;
    if let Some(p) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")
        && let Some(s) = section(&p, &profile)?
    {
        any = true;
        found.extend(s);
    }
    if let Some(p) = file("AWS_CONFIG_FILE", ".aws/config") {
        let name = if profile == "default" { "default".to_owned() } else { format!("profile {profile}") };
        if let Some(s) = section(&p, &name)? {
            any = true;
            for (k, v) in s {
                found.entry(k).or_insert(v); // the credentials file wins
            }
        }
    }
    let bad = |why: String| RemoteError::BadUrl { url: url.to_owned(), why };
    if !any {
        return match named {
            Some(n) => Err(bad(format!("AWS_PROFILE={n}: no such profile in ~/.aws/credentials or ~/.aws/config"))),
            None => Ok(Vec::new()),
        };
    }
    let keyed = found.contains_key("aws_access_key_id");
    const ELSEWHERE: [&str; 5] = ["sso_session", "sso_start_url", "role_arn", "credential_process", "web_identity_token_file"];
    if !keyed
        && env("AWS_ACCESS_KEY_ID").is_none()
        && let Some(k) = ELSEWHERE.iter().find(|k| found.contains_key(**k))
    {
        return Err(bad(format!(
            "AWS profile {profile} gets its keys through {k}, which caev2 does not run; \
             export them first: eval \"$(aws configure export-credentials --profile {profile} --format env)\""
        )));
    }
    let mut out = Vec::new();
    for (key, var, setting) in [
        ("aws_access_key_id", "AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("aws_session_token", "AWS_SESSION_TOKEN", "aws_session_token"),
        ("region", "AWS_REGION", "aws_region"),
        ("endpoint_url", "AWS_ENDPOINT_URL", "aws_endpoint"),
    ] {
        let set_by_env = env(var).is_some() || (var == "AWS_REGION" && env("AWS_DEFAULT_REGION").is_some());
        // keys only as a pair: a profile's key never mixes with the environment's secret
        let paired = !key.starts_with("aws_") || env("AWS_ACCESS_KEY_ID").is_none();
        if let (Some(v), false, true) = (found.get(key), set_by_env, paired) {
            out.push((setting.to_owned(), v.clone()));
        }
    }
    Ok(out)
}

/// The `key = value` lines of `[name]` in an INI file; `None` when the file
/// or the section does not exist.
fn section(path: &Path, name: &str) -> Result<Option<BTreeMap<String, String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RemoteError::Io { path: path.to_owned(), op: "read", source }),
    };
    let mut inside = false;
    let mut found = None::<BTreeMap<String, String>>;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            if inside {
                found.get_or_insert_with(BTreeMap::new);
            }
            continue;
        }
        if inside
            && let Some((k, v)) = line.split_once('=')
            && let Some(map) = found.as_mut()
        {
            map.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(files: &[(&str, &str)], vars: &[(&str, &str)]) -> Result<Vec<(String, String)>> {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join(".aws")).expect("mkdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(".aws").join(name), text).expect("write");
        }
        let home = dir.path().to_string_lossy().into_owned();
        let env = |k: &str| if k == "HOME" { Some(home.clone()) } else { vars.iter().find(|(v, _)| *v == k).map(|(_, x)| (*x).to_owned()) };
        settings("s3://b/p", &env)
    }

    #[test]
    fn profiles_give_keys_region_and_endpoint_and_the_environment_wins() {
        let creds =
            "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n[lab]\naws_access_key_id=LK\naws_secret_access_key=LS\n";
        let config = "[default]\nregion = eu-west-1\n[profile lab]\nregion = us-east-2\nendpoint_url = http://127.0.0.1:9000\n";
        let files = [("credentials", creds), ("config", config)];
        let got = with(&files, &[]).expect("default");
        assert_eq!(
            got,
            vec![
                ("aws_access_key_id".into(), "AK".into()),
                ("aws_secret_access_key".into(), "SK".into()),
                ("aws_region".into(), "eu-west-1".into())
            ]
        );
        let got = with(&files, &[("AWS_PROFILE", "lab"), ("AWS_REGION", "ap-south-1")]).expect("lab");
        assert!(got.contains(&("aws_endpoint".into(), "http://127.0.0.1:9000".into())));
        assert!(got.contains(&("aws_access_key_id".into(), "LK".into())));
        assert!(!got.iter().any(|(k, _)| k == "aws_region"), "AWS_REGION wins: {got:?}");
        // keys in the environment: the profile's are not mixed in
        let got = with(&files, &[("AWS_ACCESS_KEY_ID", "E"), ("AWS_SECRET_ACCESS_KEY", "ES")]).expect("env keys");
        assert_eq!(got, vec![("aws_region".into(), "eu-west-1".into())]);
    }

    #[test]
    fn missing_and_unsupported_profiles_are_refused_with_the_way_around() {
        assert!(with(&[], &[]).expect("no files").is_empty());
        let e = with(&[], &[("AWS_PROFILE", "nope")]).expect_err("missing");
        assert!(e.to_string().contains("AWS_PROFILE=nope: no such profile"), "{e}");
        let e = with(&[("config", "[profile sso]\nsso_session = corp\n")], &[("AWS_PROFILE", "sso")]).expect_err("sso");
        assert!(e.to_string().contains("export-credentials --profile sso"), "{e}");
    }
}
