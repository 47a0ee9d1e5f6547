use super::*;
use proptest::prelude::*;

/// The body Gemini sends with a 429, as the JS SDK serializes it.
const GEMINI_429: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-flash-lite"},"quotaValue":"30"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;

/// A QuotaFailure violation as Gemini writes it; Google leaves `quotaValue` out when it is 0.
fn violation(id: &str, value: Option<&str>) -> String {
  let value = value.map_or(String::new(), |v| format!(r#","quotaValue":"{v}""#));
  format!(
    r#"{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"{id}","quotaDimensions":{{"location":"global","model":"gemini-2.5-flash"}}{value}}}"#
  )
}

/// A Gemini 429 body: its message, its violations, and RetryInfo when a delay is given.
fn body(message: &str, violations: &[String], retry_delay: Option<&str>) -> String {
  let retry = retry_delay.map_or(String::new(), |d| {
    format!(r#",{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{d}"}}"#)
  });
  format!(
    r#"{{"error":{{"code":429,"message":"{message}","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.Help","links":[{{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}}]}},{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{}]}}{retry}]}}}}"#,
    violations.join(",")
  )
}

const DAY: &str = "GenerateRequestsPerDayPerProjectPerModel-FreeTier";
const MINUTE: &str = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier";
const TOKENS: &str = "GenerateContentInputTokensPerModelPerMinute-FreeTier";

fn limited(text: &str) -> RateLimit {
  match classify(text) {
    Failure::RateLimited(rate) => rate,
    other => panic!("{other:?} for {text}"),
  }
}

fn limit(
  scope: QuotaScope,
  zero_quota: bool,
  quota_value: Option<u64>,
  retry_after_ms: Option<Millis>,
) -> RateLimit {
  RateLimit {
    scope,
    zero_quota,
    quota_value,
    retry_after_ms,
  }
}

#[test]
fn gemini_429_body_gives_delay_and_quota() {
  assert_eq!(
    classify(GEMINI_429),
    Failure::RateLimited(limit(
      QuotaScope::PerMinuteRequests,
      false,
      Some(30),
      Some(17_000)
    ))
  );
}

#[test]
fn each_scope_from_its_quota_id() {
  let scope = |id: &str| limited(&body("quota", &[violation(id, Some("9"))], None)).scope;
  assert_eq!(scope(DAY), QuotaScope::PerDay);
  assert_eq!(scope(MINUTE), QuotaScope::PerMinuteRequests);
  assert_eq!(scope(TOKENS), QuotaScope::PerMinuteTokens);
  assert_eq!(
    scope("GenerateContentPaidTierInputTokensPerModelPerMinute"),
    QuotaScope::PerMinuteTokens
  );
  assert_eq!(
    scope("GenerateRequestsPerMinutePerProjectPerModel"),
    QuotaScope::PerMinuteRequests
  );
  assert_eq!(scope("SomethingPerHour"), QuotaScope::Unknown);
}

#[test]
fn a_spent_day_is_per_day_whatever_its_short_retry_delay() {
  for (delay, ms) in [("0s", 0), ("18s", 18_000), ("34s", 34_000)] {
    let text = body("quota", &[violation(DAY, Some("20"))], Some(delay));
    assert_eq!(
      limited(&text),
      limit(QuotaScope::PerDay, false, Some(20), Some(ms))
    );
  }
}

#[test]
fn several_violations_take_the_widest() {
  let all = [
    violation(MINUTE, Some("15")),
    violation(DAY, Some("200")),
    violation(TOKENS, Some("1000000")),
  ];
  let rate = limited(&body("quota", &all, Some("47s")));
  assert_eq!(
    rate,
    limit(QuotaScope::PerDay, false, Some(200), Some(47_000))
  );
  let mut reversed = all.clone();
  reversed.reverse();
  assert_eq!(limited(&body("quota", &reversed, Some("47s"))), rate);
  let minute = [
    violation(TOKENS, Some("250000")),
    violation(MINUTE, Some("10")),
  ];
  assert_eq!(
    limited(&body("quota", &minute, None)),
    limit(QuotaScope::PerMinuteTokens, false, Some(250_000), None)
  );
}

#[test]
fn a_value_belongs_to_its_own_violation() {
  // The day's violation has no quotaValue: the minute's 15 after it is not the day's.
  let text = body(
    "quota",
    &[violation(DAY, None), violation(MINUTE, Some("15"))],
    None,
  );
  assert_eq!(limited(&text), limit(QuotaScope::PerDay, false, None, None));
  // The older ErrorInfo form, whose metadata map may put the value before the id.
  let error_info = r#"[GoogleGenerativeAI Error]: Error fetching from https://generativelanguage.googleapis.com/v1/models/gemini-pro:generateContent: [429 Too Many Requests] Quota exceeded for quota metric 'Generate Content API requests per minute' and limit 'GenerateContent request limit per minute for a region' of service 'generativelanguage.googleapis.com' for consumer 'project_number:1234567'. [{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com","consumer":"projects/1234567","quota_limit_value":"60","quota_metric":"generativelanguage.googleapis.com/generate_content_requests","quota_limit":"GenerateContentRequestsPerMinutePerProjectPerRegion"}}]"#;
  assert_eq!(
    limited(error_info),
    limit(QuotaScope::PerMinuteRequests, false, Some(60), None)
  );
}

#[test]
fn zero_quota_from_quota_value_or_the_message() {
  let explicit = body(
    "quota",
    &[violation(DAY, Some("200")), violation(MINUTE, Some("0"))],
    Some("5s"),
  );
  assert_eq!(
    limited(&explicit),
    limit(QuotaScope::PerDay, true, Some(200), Some(5_000))
  );
  // What Gemini sends for a model the tier lacks: no quotaValue at all, "limit: 0" in the message.
  let line = |metric: &str| {
    format!("\\n* Quota exceeded for metric: generativelanguage.googleapis.com/{metric}, limit: 0, model: gemini-2.5-pro")
  };
  let message = format!(
    "You exceeded your current quota.{}{}{}\\nPlease retry in 10.689924287s.",
    line("generate_content_free_tier_requests"),
    line("generate_content_free_tier_requests"),
    line("generate_content_free_tier_input_token_count"),
  );
  let none = [
    violation(DAY, None),
    violation(MINUTE, None),
    violation(TOKENS, None),
  ];
  assert_eq!(
    limited(&body(&message, &none, Some("10s"))),
    limit(QuotaScope::PerDay, true, Some(0), Some(10_690))
  );
  // Lines that disagree name no one limit.
  let mixed = "[429 Too Many Requests] \n* Quota exceeded for metric: a, limit: 15, model: m\n* Quota exceeded for metric: b, limit: 1000000, model: m\n";
  assert_eq!(
    limited(mixed),
    limit(QuotaScope::Unknown, false, None, None)
  );
  let one = "[429 Too Many Requests] \n* Quota exceeded for metric: a, limit: 20, model: m\nPlease retry in 51.6s.";
  assert_eq!(
    limited(one),
    limit(QuotaScope::Unknown, false, Some(20), Some(51_600))
  );
}

#[test]
fn retry_delays_keep_their_fractions() {
  for (delay, ms) in [
    ("0s", 0),
    ("0.5s", 500),
    ("18.036s", 18_036),
    ("1.0000001s", 1_001),
    ("0.000000001s", 1),
    ("86400s", 86_400_000),
  ] {
    let text = body("quota", &[violation(MINUTE, Some("10"))], Some(delay));
    assert_eq!(limited(&text).retry_after_ms, Some(ms), "{delay}");
  }
}

#[test]
fn the_messages_retry_in_counts_and_the_later_of_the_two_wins() {
  let retry = |text: &str| limited(text).retry_after_ms;
  assert_eq!(retry("429 Please retry in 17.5s"), Some(17_500));
  assert_eq!(retry("RESOURCE_EXHAUSTED: retry in 3s"), Some(3_000));
  assert_eq!(
    retry("[429 Too Many Requests] Please retry in 250ms"),
    Some(250)
  );
  assert_eq!(retry("429 Please retry in 1m30.5s."), Some(90_500));
  assert_eq!(retry("429 Please Retry In 2s"), Some(2_000));
  // Google truncates retryDelay; the message has the rest.
  let truncated = body(
    "You exceeded your current quota.\\nPlease retry in 36.429760048s.",
    &[violation(DAY, Some("20"))],
    Some("36s"),
  );
  assert_eq!(retry(&truncated), Some(36_430));
  let longer_field = body(
    "Please retry in 3s.",
    &[violation(MINUTE, Some("10"))],
    Some("20s"),
  );
  assert_eq!(retry(&longer_field), Some(20_000));
}

#[test]
fn a_429_without_details_is_of_unknown_scope() {
  let unknown = limit(QuotaScope::Unknown, false, None, None);
  for text in [
    r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#,
    r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.Help","links":[]}]}}"#,
    "[429 Too Many Requests] no room",
    "429 RESOURCE_EXHAUSTED",
    "Too Many Requests",
    r#"429 {"error":{"code":429}}"#,
  ] {
    assert_eq!(limited(text), unknown, "{text}");
  }
}

#[test]
fn sdk_messages_and_day_and_token_quotas() {
  let sdk = "[GoogleGenerativeAI Error]: Error fetching from https://x: [429 Too Many Requests] Resource has been exhausted";
  assert_eq!(limited(sdk), limit(QuotaScope::Unknown, false, None, None));
  let day = r#"RESOURCE_EXHAUSTED "quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier", "retryDelay": "1.5s""#;
  assert_eq!(
    limited(day),
    limit(QuotaScope::PerDay, false, None, Some(1_500))
  );
  let tokens = r#"429 {"quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier"}"#;
  assert_eq!(limited(tokens).scope, QuotaScope::PerMinuteTokens);
}

#[test]
fn every_sdks_wrapping_reads_the_same() {
  let raw = body(
    "You exceeded your current quota.\\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash\\nPlease retry in 18.2s.",
    &[violation(DAY, Some("20"))],
    Some("18s"),
  );
  let expected = limit(QuotaScope::PerDay, false, Some(20), Some(18_200));
  let details = &raw[raw.find(r#""details":"#).unwrap() + 10..raw.len() - 2];
  // @google/generative-ai: status and message, then the details as JSON.
  let generative_ai = format!(
    "[GoogleGenerativeAI Error]: Error fetching from https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent: [429 Too Many Requests] You exceeded your current quota.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash\nPlease retry in 18.2s. {details}"
  );
  // LangChain's ChatGoogleGenerativeAI rethrows it, with its troubleshooting link.
  let langchain = format!(
    "GoogleGenerativeAIFetchError: {generative_ai}\n\nTroubleshooting URL: https://docs.langchain.com/oss/javascript/langchain/errors/MODEL_RATE_LIMIT/\n"
  );
  // @google/genai: ApiError's message is the body; older versions wrapped it as an escaped string.
  let genai = format!("ApiError: {raw}");
  let escaped = serde_json::to_string(&raw).unwrap();
  let genai_old = format!(
    r#"got status: 429 Too Many Requests. {{"error":{{"message":{escaped},"code":429,"status":"Too Many Requests"}}}}"#
  );
  let twice = serde_json::to_string(&genai_old).unwrap();
  // The router's report: the status, a space, the body.
  let router = format!("429 {raw}");
  // Python's SDK prints the body as a dict.
  let python = format!("429 RESOURCE_EXHAUSTED. {}", raw.replace('"', "'"));
  for text in [
    &raw,
    &generative_ai,
    &langchain,
    &genai,
    &genai_old,
    &twice,
    &router,
    &python,
  ] {
    assert_eq!(limited(text), expected, "{text}");
  }
}

#[test]
fn overload_and_internal_errors_are_the_models() {
  for text in [
    "[503 Service Unavailable] The model is overloaded",
    r#"ApiError: {"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
    r#"got status: UNAVAILABLE. {"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
    r#"{"error":{"code":500,"message":"An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting","status":"INTERNAL"}}"#,
    "[GoogleGenerativeAI Error]: Error fetching from https://x: [500 Internal Server Error] An internal error has occurred.",
    "503",
    "The model is Overloaded",
  ] {
    assert_eq!(classify(text), Failure::Overloaded, "{text}");
  }
  // A 429 or a refused key in the same text says more.
  assert!(matches!(
    classify("429 RESOURCE_EXHAUSTED after the model was overloaded"),
    Failure::RateLimited(_)
  ));
  assert_eq!(
    classify("403 PERMISSION_DENIED (after a 503)"),
    Failure::KeyRejected
  );
}

#[test]
fn rejected_keys() {
  for text in [
    "API key not valid. Please pass a valid API key. [API_KEY_INVALID]",
    r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#,
    "[401 Unauthorized]",
    r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#,
    r#"{"error":{"code":400,"message":"API key expired. Please renew the API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
    r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 123456 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com","metadata":{"consumer":"projects/123456","service":"generativelanguage.googleapis.com"}}]}}"#,
    "[400 Bad Request] API key not valid. API_KEY_INVALID",
  ] {
    assert_eq!(classify(text), Failure::KeyRejected, "{text}");
  }
}

#[test]
fn other_failures_are_transient() {
  for text in [
    "request timed out after 4031ms",
    "boom",
    "",
    "quota",
    "TypeError: fetch failed\n    at node:internal/deps/undici/undici:13510:13",
    "Error: read ECONNRESET",
    r#"{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}"#,
    "[502 Bad Gateway]",
    r#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#,
  ] {
    assert_eq!(classify(text), Failure::Transient, "{text}");
  }
}

#[test]
fn status_codes_are_whole_words() {
  for text in [
    "took 4031ms",
    "tokens 14290",
    "x429 y",
    "429s",
    "waited 429.5 s",
    "version 1.429",
    "status 5003",
    "1500 tokens",
  ] {
    assert_eq!(classify(text), Failure::Transient, "{text}");
  }
  for text in [
    r#"{"code": 429}"#,
    "429 {",
    "[429 Too Many Requests]",
    "HTTP 429.",
    "(429)",
  ] {
    assert!(matches!(classify(text), Failure::RateLimited(_)), "{text}");
  }
}

#[test]
fn the_consumer_project_of_an_error_info() {
  let disabled = r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 123456 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com","consumer":"projects/123456"}}]}}"#;
  assert_eq!(consumer_project(disabled).as_deref(), Some("123456"));
  let escaped = serde_json::to_string(disabled).unwrap();
  assert_eq!(consumer_project(&escaped).as_deref(), Some("123456"));
  let suspended = r#"[GoogleGenerativeAI Error]: [403 Forbidden] Permission denied: Consumer 'api_key:AIzaXXXX' has been suspended. [{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED","domain":"googleapis.com","metadata":{"consumer": "projects/578829824020","service":"generativelanguage.googleapis.com"}}]"#;
  assert_eq!(consumer_project(suspended).as_deref(), Some("578829824020"));
  let by_id =
    r#"{'metadata': {'consumer': 'projects/my-project-466015', 'service': 'x.googleapis.com'}}"#;
  assert_eq!(
    consumer_project(by_id).as_deref(),
    Some("my-project-466015")
  );
  // A 429's ErrorInfo names it too.
  assert_eq!(
    consumer_project(r#"429 {"metadata":{"quota_limit_value":"60","consumer":"projects/42"}}"#)
      .as_deref(),
    Some("42")
  );
}

#[test]
fn no_consumer_project_where_none_is_named() {
  for text in [
    "",
    GEMINI_429,
    "Quota exceeded for consumer 'project_number:681255809395'.",
    "Permission denied: Consumer 'api_key:AIzaXXXX' has been suspended.",
    r#""consumer": "projects/""#,
    r#""consumer": "projects/***********""#,
    r#""consumer": "api_key:AIzaXXXX""#,
    r#""consumer": "projects/123"#,
    r#""serviceconsumer": "projects/123""#,
    r#"consumer: projects/123"#,
  ] {
    assert_eq!(consumer_project(text), None, "{text}");
  }
}

#[test]
fn odd_retry_delays_are_ignored() {
  for text in [
    r#""retryDelay": "abc""#,
    r#""retryDelay": "17ms""#,
    r#""retryDelay": "99999999s""#,
    r#""retryDelay": "86400.001s""#,
    r#""retryDelay": "-1s""#,
    r#""retryDelay": "1e3s""#,
    r#""retryDelay": "123456789012345678901234567890s""#,
    r#""retryDelay": 17"#,
    r#""retryDelay": "s""#,
    r#""retryDelay": "1.s""#,
    r#"retryDelay unknown, later 5s"#,
    r#""myretryDelay": "5s""#,
  ] {
    assert_eq!(retry_delay(text), None, "{text}");
  }
  for text in [
    "retry in 90000s",
    "retry in ",
    "retry in 3 seconds",
    "retry in s",
    "retry in 5parsecs",
  ] {
    assert_eq!(retry_in(text), None, "{text}");
  }
}

/// Every character boundary of a text.
fn boundaries(text: &str) -> impl Iterator<Item = usize> + '_ {
  text.char_indices().map(|(i, _)| i).chain([text.len()])
}

#[test]
fn truncated_texts_never_panic_and_read_what_they_hold() {
  let day = body(
    "You exceeded your current quota.\\n* Quota exceeded for metric: m, limit: 0, model: é\\nPlease retry in 10.5s.",
    &[violation(DAY, None), violation(TOKENS, None)],
    Some("10s"),
  );
  let escaped = serde_json::to_string(&day).unwrap();
  let rejected = r#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","metadata":{"consumer":"projects/123456"}}]}}"#;
  for text in [day.as_str(), escaped.as_str(), rejected] {
    for i in boundaries(text) {
      for cut in [&text[..i], &text[i..]] {
        classify(cut);
        consumer_project(cut);
      }
    }
  }
  // A text cut short still reads the day's quotaId once the whole field is in.
  for text in [&day, &escaped] {
    let after_id = text.find(DAY).unwrap() + DAY.len();
    let whole_field = after_id + text[after_id..].find('"').unwrap() + 1;
    for i in boundaries(text).filter(|&i| i >= whole_field) {
      assert_eq!(
        limited(&text[..i]).scope,
        QuotaScope::PerDay,
        "{}",
        &text[..i]
      );
    }
  }
}

#[test]
fn huge_numbers_and_unicode_are_read_or_ignored_not_fatal() {
  let huge = body(
    "Quota exceeded for metric: m, limit: 99999999999999999999999, model: m",
    &[violation(DAY, Some("99999999999999999999999"))],
    Some("99999999999999999999.5s"),
  );
  assert_eq!(limited(&huge), limit(QuotaScope::PerDay, false, None, None));
  assert_eq!(retry_in("retry in 9999999999999999999999h"), None);
  assert_eq!(
    retry_in(&format!("retry in {}", "1h".repeat(100_000))),
    None
  );
  assert_eq!(retry_in("Please retry in 2µs"), Some(1));
  assert_eq!(retry_in("Please retry in 1.5μs!"), Some(1));
  assert_eq!(retry_in("retry in 3sé"), None);
  assert_eq!(retry_in("retry in 3s é"), Some(3_000));
  assert!(matches!(classify("🚫429🚫"), Failure::RateLimited(_)));
  assert_eq!(classify("é503é"), Failure::Overloaded);
  // Typographic quotes, as pages reprinting bodies have them, are not JSON's.
  assert_eq!(
    limited("429 “quotaId”: “GenerateRequestsPerDayPerProjectPerModel-FreeTier”").scope,
    QuotaScope::Unknown
  );
  for text in [
    r#"\\\\\"\"'''\"\\"#,
    r#""quotaId""#,
    r#"quotaId":"#,
    "'quotaId': ",
    r#"429 "quotaId": '"#,
    r#"429 "retryDelay":"é"#,
    r#"429 "quotaValue":"1" "quotaId":"x"}}}}{{{{"#,
    r#"429 }}}}"quotaId":"PerDay"{{{{"#,
    r#"429 "quotaId":"a 'quotaId':'PerDay' b""#,
    "retry in é",
    "Quota exceeded for metricQuota exceeded for metric, limit: é",
    r#""consumer": "projects/é""#,
    "\u{0}\u{ffff}\u{10ffff}",
  ] {
    classify(text);
    consumer_project(text);
  }
}

#[test]
fn pathological_texts_are_read_in_linear_time() {
  let start = std::time::Instant::now();
  for unit in [
    r#"{"quotaId":"#,
    r#""quotaId":"PerDay","#,
    r#"{"quotaId":"PerMinute","quotaValue":"1"}"#,
    "{",
    "}",
    r#"'quotaId': ""#,
    r#""retryDelay": "1"#,
    "retry in 1",
    "Quota exceeded for metric",
    r#""consumer":"projects/"#,
    "429.",
    r"\\\\",
  ] {
    let text = format!("429 {}", unit.repeat(200_000 / unit.len()));
    classify(&text);
    consumer_project(&text);
  }
  // Quadratic work on these would take minutes.
  assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

fn fragment() -> impl Strategy<Value = String> {
  prop_oneof![
    prop::sample::select(vec![
      "\"",
      "'",
      "\\",
      ":",
      " ",
      ",",
      "{",
      "}",
      ".",
      "s",
      "ms",
      "m",
      "µ",
      "é",
      "0",
      "429",
      "503",
      "403",
      "quotaId",
      "quotaValue",
      "quota_limit",
      "retryDelay",
      "consumer",
      "projects/",
      "PerDay",
      "PerMinute",
      "Token",
      "retry in ",
      "limit: ",
      "Quota exceeded for metric",
      "RESOURCE_EXHAUSTED",
      "\n",
    ])
    .prop_map(str::to_owned),
    "[0-9]{1,25}",
    "\\PC{0,4}",
  ]
}

proptest! {
  #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

  #[test]
  fn any_text_is_read_without_panic(text in "\\PC*") {
    classify(&text);
    consumer_project(&text);
  }

  #[test]
  fn texts_made_of_error_fragments_are_read_within_bounds(
    parts in prop::collection::vec(fragment(), 0..48),
  ) {
    let text = parts.concat();
    if let Failure::RateLimited(rate) = classify(&text) {
      prop_assert!(rate.retry_after_ms.is_none_or(|ms| (0..=86_400_000).contains(&ms)));
      prop_assert!(!rate.zero_quota || text.contains('0'));
    }
    if let Some(project) = consumer_project(&text) {
      let named = format!("projects/{project}");
      prop_assert!(text.contains(&named));
    }
  }
}
