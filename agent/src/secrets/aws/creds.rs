//! AWS credentials for the agent: from the environment, a shared credentials/config profile,
//! or a web identity token exchanged with STS (`AssumeRoleWithWebIdentity`). Parsing is pure.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::SecretString;
use crate::secrets::http::secret_bytes;

#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
    /// When temporary credentials stop working.
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, read through
/// `var` (the environment in production).
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<AwsCredentials, String> {
    let id = var("AWS_ACCESS_KEY_ID")
        .filter(|v| !v.is_empty())
        .ok_or("AWS_ACCESS_KEY_ID is not set")?;
    let secret = var("AWS_SECRET_ACCESS_KEY")
        .filter(|v| !v.is_empty())
        .ok_or("AWS_SECRET_ACCESS_KEY is not set")?;
    Ok(AwsCredentials {
        access_key_id: id,
        secret_access_key: SecretString::new(secret),
        session_token: var("AWS_SESSION_TOKEN")
            .filter(|v| !v.is_empty())
            .map(SecretString::new),
        expires: None,
    })
}

/// The shared credentials file: `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
pub fn credentials_file() -> Option<PathBuf> {
    std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".aws/credentials")))
}

/// The shared config file: `AWS_CONFIG_FILE`, else `~/.aws/config`.
pub fn config_file() -> Option<PathBuf> {
    std::env::var_os("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".aws/config")))
}

/// Static keys of `profile` in an INI file. In the credentials file sections are `[name]`; in
/// the config file `[profile name]` (and `[default]`). `Ok(None)`: no such section.
pub fn parse_profile(
    text: &str,
    profile: &str,
    config_style: bool,
) -> Result<Option<AwsCredentials>, String> {
    let mut in_section = false;
    let mut found = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let name = if config_style && section != "default" {
                section.strip_prefix("profile").map(str::trim)
            } else {
                Some(section)
            };
            in_section = name == Some(profile);
            found |= in_section;
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(SecretString::new(v)),
            "aws_session_token" => token = Some(SecretString::new(v)),
            _ => {}
        }
    }
    if !found {
        return Ok(None);
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(AwsCredentials {
            access_key_id,
            secret_access_key,
            session_token: token,
            expires: None,
        })),
        _ => Err(format!(
            "profile {profile:?} has no aws_access_key_id/aws_secret_access_key (only static keys are supported)"
        )),
    }
}

/// The form body of an STS `AssumeRoleWithWebIdentity` call (unsigned: the token is the
/// proof), in a zeroizing buffer (URL encoding writes a byte as at most three).
pub fn assume_role_body(role_arn: &str, session_name: &str, token: &SecretString) -> Bytes {
    let fields = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("WebIdentityToken", token.expose()),
    ];
    let len: usize = fields.iter().map(|(k, v)| k.len() + 3 * v.len() + 2).sum();
    secret_bytes(len, |buf| {
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                buf.push(b'&');
            }
            buf.extend_from_slice(k.as_bytes());
            buf.push(b'=');
            for chunk in form_urlencoded::byte_serialize(v.as_bytes()) {
                buf.extend_from_slice(chunk.as_bytes());
            }
        }
    })
}

/// Parses the XML answer of `AssumeRoleWithWebIdentity`.
pub fn parse_assume_role(xml: &str) -> Result<AwsCredentials, String> {
    let creds = element(xml, "Credentials").ok_or("the STS answer has no Credentials")?;
    let get = |name: &str| {
        element(creds, name)
            .map(xml_unescape)
            .ok_or(format!("the STS answer has no {name}"))
    };
    let expires = element(creds, "Expiration").and_then(parse_iso8601);
    Ok(AwsCredentials {
        access_key_id: get("AccessKeyId")?,
        secret_access_key: SecretString::new(get("SecretAccessKey")?),
        session_token: Some(SecretString::new(get("SessionToken")?)),
        expires,
    })
}

/// The error code and message of an STS XML error answer.
pub fn parse_sts_error(xml: &str) -> String {
    let code = element(xml, "Code").unwrap_or("unknown error");
    match element(xml, "Message") {
        Some(m) => format!("{code}: {}", xml_unescape(m)),
        None => code.to_string(),
    }
}

/// The text of the first `<name>…</name>` element (no attributes expected).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].trim())
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// `2024-05-01T12:00:00Z` or with fractional seconds.
pub fn parse_iso8601(s: &str) -> Option<SystemTime> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_credentials() {
        let vars = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKID".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("CANARY-secret".to_string()),
            _ => None,
        };
        let c = from_env(vars).unwrap();
        assert_eq!(c.access_key_id, "AKID");
        assert!(c.session_token.is_none());
        assert!(!format!("{c:?}").contains("CANARY"));
        assert!(from_env(|_| None).is_err());
    }

    #[test]
    fn profiles() {
        let text = "[default]\naws_access_key_id = D\naws_secret_access_key = ds\n\n# c\n[ci]\naws_access_key_id=CI\naws_secret_access_key=cs\naws_session_token = tok\n";
        let c = parse_profile(text, "ci", false).unwrap().unwrap();
        assert_eq!(c.access_key_id, "CI");
        assert_eq!(c.secret_access_key.expose(), "cs");
        assert_eq!(c.session_token.unwrap().expose(), "tok");
        assert_eq!(
            parse_profile(text, "default", false)
                .unwrap()
                .unwrap()
                .access_key_id,
            "D"
        );
        assert!(parse_profile(text, "nope", false).unwrap().is_none());
        let config =
            "[profile ci]\nregion = x\naws_access_key_id = P\naws_secret_access_key = ps\n";
        assert_eq!(
            parse_profile(config, "ci", true)
                .unwrap()
                .unwrap()
                .access_key_id,
            "P"
        );
        assert!(parse_profile("[sso]\nsso_start_url = x\n", "sso", false).is_err());
    }

    #[test]
    fn sts_answer() {
        let xml = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <SessionToken>FQoGZXIvYXdzE&amp;x</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI</SecretAccessKey>
      <Expiration>2015-08-30T13:36:00.5Z</Expiration>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"#;
        let c = parse_assume_role(xml).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.session_token.unwrap().expose(), "FQoGZXIvYXdzE&x");
        assert_eq!(
            c.expires,
            Some(UNIX_EPOCH + Duration::from_secs(1_440_941_760))
        );
        let err = "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>bad</Message></Error></ErrorResponse>";
        assert_eq!(parse_sts_error(err), "InvalidIdentityToken: bad");
    }

    #[test]
    fn form_body_is_encoded() {
        let b = assume_role_body(
            "arn:aws:iam::123:role/r",
            "latch",
            &SecretString::new("a.b+c=".into()),
        );
        let b = std::str::from_utf8(&b).unwrap();
        assert_eq!(
            b,
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15\
             &RoleArn=arn%3Aaws%3Aiam%3A%3A123%3Arole%2Fr&RoleSessionName=latch\
             &WebIdentityToken=a.b%2Bc%3D"
        );
        // every byte needing escape (three output bytes each) still fits the buffer
        let nasty = "/".repeat(300);
        let b = assume_role_body("r", "s", &SecretString::new(nasty));
        assert!(b.ends_with("%2F".repeat(300).as_bytes()));
    }

    #[test]
    fn iso_dates() {
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_iso8601("2000-03-01T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(951_868_800))
        );
        assert!(parse_iso8601("garbage").is_none());
    }
}
