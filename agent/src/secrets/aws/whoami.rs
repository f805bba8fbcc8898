//! Which AWS principal a store's credentials are (`sts:GetCallerIdentity`, for `latch doctor`),
//! and what an AWS refusal of the agent's own credentials means for the person fixing it.
//! Pure: the I/O is in [`super::AwsStore`].

/// The form body of `sts:GetCallerIdentity`.
pub const GET_CALLER_IDENTITY: &[u8] = b"Action=GetCallerIdentity&Version=2011-06-15";

/// The caller's ARN in a `GetCallerIdentity` answer.
pub fn parse_caller_identity(xml: &str) -> Result<String, String> {
    let start = xml
        .find("<Arn>")
        .ok_or("the GetCallerIdentity answer has no Arn")?
        + "<Arn>".len();
    let end = xml[start..]
        .find("</Arn>")
        .ok_or("the GetCallerIdentity answer has no Arn")?;
    Ok(xml[start..start + end].trim().to_owned())
}

/// Whether an AWS error says the request's time is too far from AWS's clock.
pub fn is_clock_skew(code: &str, message: &str) -> bool {
    matches!(
        code,
        "RequestTimeTooSkewed" | "RequestExpired" | "RequestTimeTooSkewedException"
    ) || message.contains("Signature expired")
        || message.contains("Signature not yet current")
        || message.contains("too skewed")
}

/// An AWS refusal of the agent's own credentials (`code`: the error type), with what to
/// change.
pub fn explain_refusal(code: &str, message: &str) -> String {
    let said = if message.is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {message}")
    };
    let fix = if is_clock_skew(code, message) {
        "this machine's clock differs from AWS's by more than the 5 minutes a signature is \
         valid: synchronize it (chrony, systemd-timesyncd) and check the time zone is not \
         applied twice"
    } else {
        match code {
            "ExpiredToken" | "ExpiredTokenException" => {
                "the temporary credentials had expired although latch fetched them again: check \
                 the machine's clock and the credential source (instance role, container \
                 endpoint, web identity)"
            }
            "InvalidClientTokenId" | "UnrecognizedClientException" => {
                "AWS does not know this access key: check which credentials the machine's \
                 identity provides (`latch doctor --policy ...` shows the principal)"
            }
            "SignatureDoesNotMatch" | "InvalidSignatureException" | "IncompleteSignature" => {
                "the secret key does not belong to the access key id: check the credential \
                 source, or the store's region and endpoint"
            }
            _ => return said,
        }
    };
    format!("{said} ({fix})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_identity() {
        let xml = "<GetCallerIdentityResponse><GetCallerIdentityResult>\
            <Arn>arn:aws:sts::123456789012:assumed-role/vm-node/i-0abc</Arn>\
            <UserId>AROA:i-0abc</UserId><Account>123456789012</Account>\
            </GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            parse_caller_identity(xml).unwrap(),
            "arn:aws:sts::123456789012:assumed-role/vm-node/i-0abc"
        );
        assert!(parse_caller_identity("<Error/>").is_err());
    }

    #[test]
    fn clock_skew_is_named_with_its_fix() {
        for (code, msg) in [
            (
                "SignatureDoesNotMatch",
                "Signature expired: 20261203T100000Z is now earlier than 20261203T101500Z",
            ),
            (
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            ),
            (
                "InvalidSignatureException",
                "Signature not yet current: 20261203T120000Z is still later than 20261203T110500Z",
            ),
        ] {
            let text = explain_refusal(code, msg);
            assert!(text.contains("clock"), "{text}");
            assert!(text.contains(code), "{text}");
        }
        let text = explain_refusal(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match",
        );
        assert!(!text.contains("clock"), "{text}");
        assert!(text.contains("secret key"), "{text}");
        assert!(explain_refusal("ExpiredToken", "").contains("expired"));
        assert_eq!(
            explain_refusal("Throttling", "slow down"),
            "Throttling: slow down"
        );
    }
}
