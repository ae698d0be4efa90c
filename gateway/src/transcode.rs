//! REST/JSON ⇄ gRPC transcoding, derived entirely from the contracts'
//! `google.api.http` annotations: no per-RPC code.
//!
//! * [`RouteTable`] reads every annotated method (and its
//!   `additional_bindings`) from a [`DescriptorPool`] and routes an HTTP
//!   method + path to a [`Route`], extracting path variables.
//! * [`build_request`] turns path variables, the JSON body and the query
//!   string into the request [`DynamicMessage`].
//! * [`crate::wire_json`] renders answers as proto3 JSON.
//! * [`GatewayCodec`] lets `tonic::client::Grpc` send [`DynamicMessage`]s
//!   and receive answers as wire bytes.
//!
//! JSON choices (proto3 JSON mapping):
//!
//! * Requests accept proto field names (`deal_id`) and lowerCamelCase JSON
//!   names (`dealId`); naming the same field both ways is an error. 64-bit
//!   integers are accepted as numbers or strings, enums by name or number,
//!   `null` leaves a field unset, Timestamps/Durations/FieldMasks and other
//!   `google.protobuf` well-known types use their JSON string/object forms.
//!   Unknown fields are rejected, naming the field.
//! * Responses use proto field names, emit zero values of fields without
//!   presence (`"remaining_stock": 0`, `"next_page_token": ""`, `[]`), omit
//!   unset message fields and unset proto3 `optional` fields, render
//!   64-bit integers as strings (`"price_cents": "12900"`, as the proto3
//!   JSON mapping prescribes, so JavaScript clients lose no precision),
//!   enums as names and Timestamps as RFC 3339.

use std::collections::HashSet;

use crate::wire_json::{WireJson, WireJsonBuilder};
use bytes::{Buf as _, Bytes};
use http::Method;
use http::uri::PathAndQuery;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    MethodDescriptor, ReflectMessage, Value,
};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Full name of the `google.api.http` method option.
pub const HTTP_RULE_EXTENSION: &str = "google.api.http";

/// Deepest JSON nesting (objects and arrays) a request body may have.
pub const MAX_JSON_DEPTH: usize = 32;

/// Which part of the request message the HTTP body maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodySpec {
    /// No body: every field not bound by the path comes from the query.
    None,
    /// `body: "*"`: the body is the whole request message (minus path fields).
    Whole,
    /// `body: "field"`: the body is that top-level field (its proto name).
    Field(String),
}

/// One HTTP binding of one RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: MethodDescriptor,
    pub http_method: Method,
    /// The template as written in the annotation, e.g. `/v1/orders/{id}:cancel`.
    pub template: String,
    pub body: BodySpec,
    /// The gRPC path, e.g. `/flashmesh.order.v1.OrderService/CancelOrder`.
    pub grpc_path: PathAndQuery,
    pub server_streaming: bool,
    /// Full service name, e.g. `flashmesh.order.v1.OrderService`.
    pub service: String,
    /// Field paths (proto names, dotted) bound by the path, in template order.
    pub path_fields: Vec<String>,
    /// Renders the RPC's answers as JSON.
    pub answer: WireJson,
    vars: Vec<PathVar>,
}

impl Route {
    /// Full RPC name, e.g. `flashmesh.order.v1.OrderService.CancelOrder`.
    pub fn rpc_name(&self) -> &str {
        self.method.full_name()
    }

    /// The RPC as configuration names it, e.g.
    /// `flashmesh.order.v1.OrderService/CancelOrder`.
    pub fn rpc(&self) -> &str {
        self.grpc_path.path().trim_start_matches('/')
    }
}

#[derive(Debug, Clone)]
struct PathVar {
    field: String,
    parts: Vec<VarPart>,
}

#[derive(Debug, Clone)]
enum VarPart {
    Literal(String),
    /// A matchit parameter; `catch_all` for `**`.
    Capture {
        name: String,
        catch_all: bool,
    },
}

/// The result of [`RouteTable::lookup`].
#[derive(Debug)]
pub enum RouteLookup<'a> {
    /// `params` are `(field path, percent-decoded value)` in template order.
    Found {
        route: &'a Route,
        params: Vec<(String, String)>,
    },
    /// The path exists for other methods only.
    MethodNotAllowed {
        allowed: Vec<Method>,
    },
    NotFound,
}

/// Invalid or conflicting HTTP annotations; each variant names the RPC.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the descriptor pool has no `{HTTP_RULE_EXTENSION}` extension")]
    MissingHttpExtension,
    #[error(
        "no RPC in the descriptor pool has a `{HTTP_RULE_EXTENSION}` annotation; was the descriptor \
         set encoded with its extension options (protox `Compiler::encode_file_descriptor_set`, not \
         `prost_types::FileDescriptorSet::encode_to_vec`, which drops them)?"
    )]
    NoRoutes,
    #[error("unknown service `{0}`")]
    UnknownService(String),
    #[error("{rpc}: invalid http rule: {reason}")]
    InvalidRule { rpc: String, reason: String },
    #[error("{rpc}: invalid path template `{template}`: {reason}")]
    InvalidTemplate {
        rpc: String,
        template: String,
        reason: String,
    },
    #[error("{rpc}: {method} {template} conflicts with another route: {reason}")]
    Conflict {
        rpc: String,
        method: Method,
        template: String,
        reason: String,
    },
}

/// Every HTTP binding of the selected services, one router per HTTP method.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    routers: Vec<(Method, matchit::Router<usize>)>,
    answers: WireJsonBuilder,
}

impl RouteTable {
    /// Builds the table from the `google.api.http` annotations of `services`
    /// (full names), or of every service in the pool when `services` is empty.
    /// Methods without an annotation are not routed.
    pub fn from_descriptors(pool: &DescriptorPool, services: &[&str]) -> Result<Self, RouteError> {
        let ext = pool
            .get_extension_by_name(HTTP_RULE_EXTENSION)
            .ok_or(RouteError::MissingHttpExtension)?;
        let selected = if services.is_empty() {
            pool.services().collect::<Vec<_>>()
        } else {
            services
                .iter()
                .map(|name| {
                    pool.get_service_by_name(name)
                        .ok_or_else(|| RouteError::UnknownService((*name).to_owned()))
                })
                .collect::<Result<Vec<_>, _>>()?
        };

        let mut table = RouteTable {
            routes: Vec::new(),
            routers: Vec::new(),
            answers: WireJsonBuilder::new(pool),
        };
        for service in selected {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let rule = match options.get_extension(&ext).as_ref() {
                    Value::Message(rule) => rule.clone(),
                    _ => {
                        return Err(RouteError::InvalidRule {
                            rpc: method.full_name().to_owned(),
                            reason: "google.api.http is not a message".into(),
                        });
                    }
                };
                table.add_rule(&method, &rule, true)?;
            }
        }
        if table.routes.is_empty() {
            return Err(RouteError::NoRoutes);
        }
        Ok(table)
    }

    fn add_rule(
        &mut self,
        method: &MethodDescriptor,
        rule: &DynamicMessage,
        top_level: bool,
    ) -> Result<(), RouteError> {
        let rpc = method.full_name().to_owned();
        let invalid = |reason: String| RouteError::InvalidRule {
            rpc: rpc.clone(),
            reason,
        };

        let mut pattern: Option<(Method, String)> = None;
        for (name, http_method) in [
            ("get", Method::GET),
            ("put", Method::PUT),
            ("post", Method::POST),
            ("delete", Method::DELETE),
            ("patch", Method::PATCH),
        ] {
            if let Some(template) = string_field(rule, name) {
                pattern = Some((http_method, template));
            }
        }
        if let Some(Value::Message(custom)) = message_field(rule, "custom") {
            let kind = string_field(&custom, "kind").unwrap_or_default();
            let path = string_field(&custom, "path").unwrap_or_default();
            let http_method = Method::from_bytes(kind.as_bytes())
                .map_err(|_| invalid(format!("invalid custom method `{kind}`")))?;
            pattern = Some((http_method, path));
        }
        let (http_method, template) =
            pattern.ok_or_else(|| invalid("no get/put/post/delete/patch/custom pattern".into()))?;

        let input = method.input();
        let body = match string_field(rule, "body").unwrap_or_default().as_str() {
            "" => BodySpec::None,
            "*" => BodySpec::Whole,
            name => {
                let field = input.get_field_by_name(name).ok_or_else(|| {
                    invalid(format!(
                        "body field `{name}` is not in {}",
                        input.full_name()
                    ))
                })?;
                BodySpec::Field(field.name().to_owned())
            }
        };

        let parsed = parse_template(&template).map_err(|reason| RouteError::InvalidTemplate {
            rpc: rpc.clone(),
            template: template.clone(),
            reason,
        })?;
        let mut vars = Vec::with_capacity(parsed.vars.len());
        for (raw_field, parts) in parsed.vars {
            let fields = resolve_field_path(&input, &raw_field).ok_or_else(|| {
                RouteError::InvalidTemplate {
                    rpc: rpc.clone(),
                    template: template.clone(),
                    reason: format!("`{raw_field}` is not a field of {}", input.full_name()),
                }
            })?;
            let leaf = fields
                .last()
                .ok_or_else(|| invalid("empty field path".into()))?;
            if leaf.is_list() || leaf.is_map() || matches!(leaf.kind(), Kind::Message(_)) {
                return Err(RouteError::InvalidTemplate {
                    rpc: rpc.clone(),
                    template: template.clone(),
                    reason: format!(
                        "path variable `{raw_field}` must name a singular scalar or enum field"
                    ),
                });
            }
            if let BodySpec::Field(body) = &body
                && fields[0].name() == body
            {
                return Err(invalid(format!(
                    "`{raw_field}` is bound by both the path and the body"
                )));
            }
            vars.push(PathVar {
                field: canonical_path(&fields),
                parts,
            });
        }

        let grpc_path = PathAndQuery::try_from(format!(
            "/{}/{}",
            method.parent_service().full_name(),
            method.name()
        ))
        .map_err(|e| invalid(format!("invalid gRPC path: {e}")))?;

        let index = self.routes.len();
        let router = match self.routers.iter_mut().position(|(m, _)| *m == http_method) {
            Some(i) => &mut self.routers[i].1,
            None => {
                self.routers
                    .push((http_method.clone(), matchit::Router::new()));
                self.routers.sort_by_key(|(m, _)| method_rank(m));
                let i = self
                    .routers
                    .iter()
                    .position(|(m, _)| *m == http_method)
                    .ok_or_else(|| invalid("router vanished".into()))?;
                &mut self.routers[i].1
            }
        };
        router
            .insert(parsed.matchit_path, index)
            .map_err(|e| RouteError::Conflict {
                rpc: rpc.clone(),
                method: http_method.clone(),
                template: template.clone(),
                reason: e.to_string(),
            })?;
        let answer = self
            .answers
            .for_message(&method.output())
            .ok_or_else(|| invalid("its output type is not in the descriptor pool".into()))?;
        self.routes.push(Route {
            method: method.clone(),
            http_method,
            template,
            body,
            grpc_path,
            server_streaming: method.is_server_streaming(),
            service: method.parent_service().full_name().to_owned(),
            path_fields: vars.iter().map(|v| v.field.clone()).collect(),
            answer,
            vars,
        });

        if top_level && let Some(Value::List(bindings)) = message_field(rule, "additional_bindings")
        {
            for binding in bindings {
                if let Value::Message(binding) = binding {
                    self.add_rule(method, &binding, false)?;
                }
            }
        }
        Ok(())
    }

    /// Routes `method` + `path` (the raw, percent-encoded path; anything
    /// from `?` on is ignored).
    pub fn lookup(&self, method: &Method, path: &str) -> RouteLookup<'_> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if let Some((_, router)) = self.routers.iter().find(|(m, _)| m == method)
            && let Ok(matched) = router.at(path)
            && let Some(route) = self.routes.get(*matched.value)
        {
            let params = route
                .vars
                .iter()
                .map(|var| {
                    let value = var
                        .parts
                        .iter()
                        .map(|part| match part {
                            VarPart::Literal(lit) => lit.clone(),
                            VarPart::Capture { name, catch_all } => {
                                let raw = matched.params.get(name).unwrap_or_default();
                                percent_decode(raw, false, *catch_all)
                                    .unwrap_or_else(|| raw.to_owned())
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("/");
                    (var.field.clone(), value)
                })
                .collect();
            return RouteLookup::Found { route, params };
        }
        let allowed: Vec<Method> = self
            .routers
            .iter()
            .filter(|(m, router)| m != method && router.at(path).is_ok())
            .map(|(m, _)| m.clone())
            .collect();
        if allowed.is_empty() {
            RouteLookup::NotFound
        } else {
            RouteLookup::MethodNotAllowed { allowed }
        }
    }

    /// Every route, in annotation order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The position in [`RouteTable::routes`] of the route `method` +
    /// `path` takes, without decoding its parameters (for labelling).
    pub fn route_index(&self, method: &Method, path: &str) -> Option<usize> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let (_, router) = self.routers.iter().find(|(m, _)| m == method)?;
        router.at(path).ok().map(|matched| *matched.value)
    }
}

fn method_rank(m: &Method) -> (u8, String) {
    let rank = match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    };
    (rank, m.as_str().to_owned())
}

fn string_field(msg: &DynamicMessage, name: &str) -> Option<String> {
    let field = msg.descriptor().get_field_by_name(name)?;
    if !msg.has_field(&field) {
        return None;
    }
    msg.get_field(&field).as_str().map(str::to_owned)
}

fn message_field(msg: &DynamicMessage, name: &str) -> Option<Value> {
    let field = msg.descriptor().get_field_by_name(name)?;
    msg.has_field(&field)
        .then(|| msg.get_field(&field).into_owned())
}

struct ParsedTemplate {
    matchit_path: String,
    vars: Vec<(String, Vec<VarPart>)>,
}

/// Parses a `google.api.http` path template into a matchit route.
///
/// ```text
/// Template = "/" Segments [ Verb ] ;
/// Segments = Segment { "/" Segment } ;
/// Segment  = "*" | "**" | LITERAL | Variable ;
/// Variable = "{" FieldPath [ "=" Segments ] "}" ;
/// Verb     = ":" LITERAL ;
/// ```
fn parse_template(template: &str) -> Result<ParsedTemplate, String> {
    let rest = template
        .strip_prefix('/')
        .ok_or_else(|| "must start with `/`".to_owned())?;

    // Split into top-level segments and find the verb (a `:` after the last
    // top-level `/`, outside braces).
    let mut segments = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut verb_at = None;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => {
                if depth > 0 {
                    return Err("nested `{`".into());
                }
                depth += 1;
            }
            '}' => {
                depth = depth.checked_sub(1).ok_or("unbalanced `}`")?;
            }
            '/' if depth == 0 => {
                if verb_at.is_some() {
                    return Err("`:verb` must come last".into());
                }
                segments.push(&rest[start..i]);
                start = i + 1;
            }
            ':' if depth == 0 => verb_at = Some(i),
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced `{`".into());
    }
    let (last, verb) = match verb_at {
        Some(i) => (&rest[start..i], Some(&rest[i + 1..])),
        None => (&rest[start..], None),
    };
    segments.push(last);
    if let Some(verb) = verb
        && !is_literal(verb)
    {
        return Err(format!("invalid verb `{verb}`"));
    }

    let mut out: Vec<String> = Vec::new();
    let mut vars = Vec::new();
    let mut captures = 0usize;
    let mut catch_all_seen = false;
    let mut next_capture = |catch_all: bool| {
        captures += 1;
        let name = format!("p{}", captures - 1);
        let seg = if catch_all {
            format!("{{*{name}}}")
        } else {
            format!("{{{name}}}")
        };
        (name, seg)
    };
    for segment in segments {
        if let Some(inner) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
            if field.is_empty()
                || !field.split('.').all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
            {
                return Err(format!("invalid field path `{field}`"));
            }
            let mut parts = Vec::new();
            for sub in pattern.split('/') {
                if catch_all_seen {
                    return Err("`**` must be the last segment".into());
                }
                match sub {
                    "*" | "**" => {
                        let catch_all = sub == "**";
                        catch_all_seen |= catch_all;
                        let (name, seg) = next_capture(catch_all);
                        out.push(seg);
                        parts.push(VarPart::Capture { name, catch_all });
                    }
                    lit if is_literal(lit) => {
                        out.push(lit.to_owned());
                        parts.push(VarPart::Literal(lit.to_owned()));
                    }
                    other => return Err(format!("invalid segment `{other}` in variable")),
                }
            }
            vars.push((field.to_owned(), parts));
        } else {
            if catch_all_seen {
                return Err("`**` must be the last segment".into());
            }
            match segment {
                "*" | "**" => {
                    let catch_all = segment == "**";
                    catch_all_seen |= catch_all;
                    out.push(next_capture(catch_all).1);
                }
                lit if is_literal(lit) => out.push(lit.to_owned()),
                other => return Err(format!("invalid segment `{other}`")),
            }
        }
    }
    if let Some(verb) = verb {
        if catch_all_seen {
            return Err("a `:verb` after `**` is not supported".into());
        }
        if let Some(last) = out.last_mut() {
            last.push(':');
            last.push_str(verb);
        }
    }
    Ok(ParsedTemplate {
        matchit_path: format!("/{}", out.join("/")),
        vars,
    })
}

fn is_literal(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            !matches!(c, '{' | '}' | '*' | '/' | ':' | '=' | '?' | '#') && !c.is_whitespace()
        })
}

/// Resolves a dotted field path (proto or JSON names per segment) to its
/// fields; every segment but the last must be a singular message field.
fn resolve_field_path(desc: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut current = desc.clone();
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let field = current
            .get_field_by_name(segment)
            .or_else(|| current.get_field_by_json_name(segment))?;
        if segments.peek().is_some() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
                _ => return None,
            }
        }
        fields.push(field);
    }
    Some(fields)
}

fn canonical_path(fields: &[FieldDescriptor]) -> String {
    fields
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(".")
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// Why a request could not be transcoded; render as a 400 with
/// `errors: [{field: e.field(), description: e.description()}]`.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The body is not valid JSON.
    #[error("body: malformed JSON at line {line} column {column}: {message}")]
    MalformedJson {
        line: usize,
        column: usize,
        message: String,
    },
    /// The body nests objects/arrays deeper than [`MAX_JSON_DEPTH`].
    #[error("body: JSON nested deeper than {max} levels")]
    TooDeep { max: usize },
    /// A non-empty body on a route whose annotation has no `body`.
    #[error("body: this route takes no request body")]
    BodyNotAllowed,
    /// A body field or query parameter that the request message lacks.
    #[error("{field}: unknown {location}")]
    UnknownField {
        field: String,
        location: &'static str,
    },
    /// A field given more than once (both name forms, two oneof members,
    /// a repeated query key for a singular field).
    #[error("{field}: {description}")]
    Duplicate { field: String, description: String },
    /// A value of the wrong type or out of range.
    #[error("{field}: {description}")]
    InvalidValue { field: String, description: String },
    /// The response could not be rendered.
    #[error("response: {0}")]
    Serialize(String),
}

impl TranscodeError {
    /// The offending field path (`quantity`, `starts_at`, `items[0].quantity`),
    /// `body` for errors about the body as a whole, `query` for a malformed
    /// query string, `response` for [`TranscodeError::Serialize`].
    pub fn field(&self) -> &str {
        match self {
            Self::MalformedJson { .. } | Self::TooDeep { .. } | Self::BodyNotAllowed => "body",
            Self::UnknownField { field, .. }
            | Self::Duplicate { field, .. }
            | Self::InvalidValue { field, .. } => field,
            Self::Serialize(_) => "response",
        }
    }

    /// A human description without the field path.
    pub fn description(&self) -> String {
        match self {
            Self::MalformedJson {
                line,
                column,
                message,
            } => format!("malformed JSON at line {line} column {column}: {message}"),
            Self::TooDeep { max } => format!("JSON nested deeper than {max} levels"),
            Self::BodyNotAllowed => "this route takes no request body".into(),
            Self::UnknownField { location, .. } => format!("unknown {location}"),
            Self::Duplicate { description, .. } | Self::InvalidValue { description, .. } => {
                description.clone()
            }
            Self::Serialize(description) => description.clone(),
        }
    }
}

fn invalid(field: &str, description: impl Into<String>) -> TranscodeError {
    TranscodeError::InvalidValue {
        field: if field.is_empty() {
            "body".into()
        } else {
            field.to_owned()
        },
        description: description.into(),
    }
}

/// Builds the request message for `route`: the body (the whole message for
/// `*`, one field for `field`, nothing for none), then the path `params`
/// (from [`RouteTable::lookup`]; a body value that disagrees with the path is
/// an error), then query parameters for the remaining fields
/// (`states=A&states=B` for repeated fields, enums by name or number, nested
/// fields by dotted paths, proto or JSON names).
pub fn build_request(
    route: &Route,
    params: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, TranscodeError> {
    let input = route.method.input();
    let body_present = body.iter().any(|b| !b.is_ascii_whitespace());

    let mut message = match &route.body {
        BodySpec::None => {
            if body_present {
                return Err(TranscodeError::BodyNotAllowed);
            }
            DynamicMessage::new(input.clone())
        }
        BodySpec::Whole => {
            if body_present {
                let json = parse_json(body)?;
                json_to_message(&input, &json, "")?
            } else {
                DynamicMessage::new(input.clone())
            }
        }
        BodySpec::Field(name) => {
            let mut message = DynamicMessage::new(input.clone());
            if body_present {
                let field = input
                    .get_field_by_name(name)
                    .ok_or_else(|| invalid(name, "body field missing from the request message"))?;
                let json = parse_json(body)?;
                if !json.is_null() {
                    let value = json_to_field(&field, &json, name)?;
                    message.set_field(&field, value);
                }
            }
            message
        }
    };

    for (path, raw) in params {
        let fields =
            resolve_field_path(&input, path).ok_or_else(|| TranscodeError::UnknownField {
                field: path.clone(),
                location: "path variable",
            })?;
        set_from_string(&mut message, &fields, path, raw, true)?;
    }

    if let Some(query) = query.filter(|q| !q.is_empty()) {
        let mut seen = HashSet::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(raw_key, true, false)
                .ok_or_else(|| invalid("query", "query parameter name is not UTF-8"))?;
            let value = percent_decode(raw_value, true, false)
                .ok_or_else(|| invalid(&key, "query parameter value is not UTF-8"))?;
            if route.body == BodySpec::Whole {
                return Err(invalid(
                    &key,
                    "this route takes every field in the body, not in the query string",
                ));
            }
            let fields =
                resolve_field_path(&input, &key).ok_or_else(|| TranscodeError::UnknownField {
                    field: key.clone(),
                    location: "query parameter",
                })?;
            let path = canonical_path(&fields);
            if let BodySpec::Field(body) = &route.body
                && fields[0].name() == body
            {
                return Err(invalid(&path, "this field is taken from the body"));
            }
            if route.path_fields.iter().any(|p| {
                p == &path
                    || p.starts_with(&format!("{path}."))
                    || path.starts_with(&format!("{p}."))
            }) {
                return Err(invalid(&path, "this field is taken from the URL path"));
            }
            let leaf = &fields[fields.len() - 1];
            if !leaf.is_list() && !seen.insert(path.clone()) {
                return Err(TranscodeError::Duplicate {
                    field: path,
                    description: "query parameter given more than once".into(),
                });
            }
            set_from_string(&mut message, &fields, &path, &value, false)?;
        }
    }
    Ok(message)
}

/// Sets the (possibly nested) field `fields` from a path or query string.
fn set_from_string(
    message: &mut DynamicMessage,
    fields: &[FieldDescriptor],
    path: &str,
    raw: &str,
    from_path: bool,
) -> Result<(), TranscodeError> {
    let (leaf, parents) = fields
        .split_last()
        .ok_or_else(|| invalid(path, "empty field path"))?;
    if leaf.is_map() {
        return Err(invalid(path, "map fields cannot be set from the URL"));
    }
    let value = string_to_value(&leaf.kind(), raw, path)?;
    let mut target = message;
    for parent in parents {
        target = match target.get_field_mut(parent) {
            Value::Message(m) => m,
            _ => return Err(invalid(path, "not a message field")),
        };
    }
    if leaf.is_list() {
        if from_path {
            return Err(invalid(path, "repeated fields cannot be bound by the path"));
        }
        match target.get_field_mut(leaf) {
            Value::List(list) => list.push(value),
            _ => return Err(invalid(path, "not a repeated field")),
        }
        return Ok(());
    }
    if from_path && target.has_field(leaf) && *target.get_field(leaf) != value {
        return Err(invalid(
            path,
            "the body's value disagrees with the URL path's",
        ));
    }
    target.set_field(leaf, value);
    Ok(())
}

fn string_to_value(kind: &Kind, raw: &str, path: &str) -> Result<Value, TranscodeError> {
    match kind {
        Kind::String => Ok(Value::String(raw.to_owned())),
        Kind::Bool => match raw {
            "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(invalid(
                path,
                format!("expected true or false, got {raw:?}"),
            )),
        },
        Kind::Bytes => decode_base64(raw)
            .map(|b| Value::Bytes(b.into()))
            .ok_or_else(|| invalid(path, "expected base64")),
        Kind::Enum(e) => enum_from_str(e, raw, path),
        Kind::Message(m) => {
            if let Some(inner) = wrapper_inner(m) {
                let mut wrapper = DynamicMessage::new(m.clone());
                wrapper.set_field(&inner, string_to_value(&inner.kind(), raw, path)?);
                return Ok(Value::Message(wrapper));
            }
            if m.full_name().starts_with("google.protobuf.") {
                return well_known_from_json(m, &serde_json::Value::String(raw.to_owned()), path);
            }
            Err(invalid(
                path,
                "message fields cannot be set from the URL; set their fields with dotted names",
            ))
        }
        _ => number_from_json(kind, &serde_json::Value::String(raw.to_owned()), path),
    }
}

/// The wrapper well-known types (`google.protobuf.Int64Value` and kin),
/// whose JSON form is their `value`.
pub(crate) const WRAPPER_TYPES: [&str; 9] = [
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
];

fn wrapper_inner(desc: &MessageDescriptor) -> Option<FieldDescriptor> {
    WRAPPER_TYPES
        .contains(&desc.full_name())
        .then(|| desc.get_field_by_name("value"))
        .flatten()
}

fn enum_from_str(
    desc: &prost_reflect::EnumDescriptor,
    raw: &str,
    path: &str,
) -> Result<Value, TranscodeError> {
    if let Some(v) = desc.get_value_by_name(raw) {
        return Ok(Value::EnumNumber(v.number()));
    }
    if let Ok(n) = raw.parse::<i32>() {
        return Ok(Value::EnumNumber(n));
    }
    let names = desc
        .values()
        .map(|v| v.name().to_owned())
        .collect::<Vec<_>>();
    Err(invalid(
        path,
        format!(
            "unknown {} value {raw:?}; expected one of {}",
            desc.name(),
            names.join(", ")
        ),
    ))
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, TranscodeError> {
    check_depth(body)?;
    serde_json::from_slice(body).map_err(|e| TranscodeError::MalformedJson {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Rejects bodies nested deeper than [`MAX_JSON_DEPTH`] before parsing.
fn check_depth(body: &[u8]) -> Result<(), TranscodeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(TranscodeError::TooDeep {
                        max: MAX_JSON_DEPTH,
                    });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Proto3 JSON → message, reporting the dotted path of the offending field.
fn json_to_message(
    desc: &MessageDescriptor,
    json: &serde_json::Value,
    path: &str,
) -> Result<DynamicMessage, TranscodeError> {
    if desc.full_name().starts_with("google.protobuf.") {
        return match well_known_from_json(desc, json, path)? {
            Value::Message(m) => Ok(m),
            _ => Err(invalid(path, "expected a message")),
        };
    }
    let object = json
        .as_object()
        .ok_or_else(|| invalid(path, format!("expected an object, got {}", json_type(json))))?;
    let mut message = DynamicMessage::new(desc.clone());
    let mut seen_fields = HashSet::new();
    let mut seen_oneofs = HashSet::new();
    for (key, value) in object {
        let field = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
            .ok_or_else(|| TranscodeError::UnknownField {
                field: join(path, key),
                location: "field",
            })?;
        let field_path = join(path, field.name());
        if !seen_fields.insert(field.number()) {
            return Err(TranscodeError::Duplicate {
                field: field_path,
                description: "field given more than once (proto and JSON names)".into(),
            });
        }
        let null_is_value = matches!(field.kind(), Kind::Message(ref m) if m.full_name() == "google.protobuf.Value")
            || matches!(field.kind(), Kind::Enum(ref e) if e.full_name() == "google.protobuf.NullValue");
        if value.is_null() && !(null_is_value && !field.is_list() && !field.is_map()) {
            continue;
        }
        if let Some(oneof) = field.containing_oneof()
            && !oneof.is_synthetic()
            && !seen_oneofs.insert(oneof.name().to_owned())
        {
            return Err(TranscodeError::Duplicate {
                field: field_path,
                description: format!("more than one member of oneof `{}` given", oneof.name()),
            });
        }
        let converted = json_to_field(&field, value, &field_path)?;
        message.set_field(&field, converted);
    }
    Ok(message)
}

/// The JSON value of a whole field (list, map or singular).
fn json_to_field(
    field: &FieldDescriptor,
    json: &serde_json::Value,
    path: &str,
) -> Result<Value, TranscodeError> {
    if field.is_map() {
        let entry = match field.kind() {
            Kind::Message(entry) => entry,
            _ => return Err(invalid(path, "malformed map field")),
        };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let object = json
            .as_object()
            .ok_or_else(|| invalid(path, format!("expected an object, got {}", json_type(json))))?;
        let mut map = std::collections::HashMap::with_capacity(object.len());
        for (k, v) in object {
            let entry_path = format!("{path}[{k}]");
            let key = match string_to_value(&key_field.kind(), k, &entry_path)? {
                Value::String(s) => MapKey::String(s),
                Value::Bool(b) => MapKey::Bool(b),
                Value::I32(n) => MapKey::I32(n),
                Value::I64(n) => MapKey::I64(n),
                Value::U32(n) => MapKey::U32(n),
                Value::U64(n) => MapKey::U64(n),
                _ => return Err(invalid(&entry_path, "invalid map key")),
            };
            if v.is_null() {
                return Err(invalid(&entry_path, "map values cannot be null"));
            }
            map.insert(key, json_to_value(&value_field.kind(), v, &entry_path)?);
        }
        return Ok(Value::Map(map));
    }
    if field.is_list() {
        let array = json
            .as_array()
            .ok_or_else(|| invalid(path, format!("expected an array, got {}", json_type(json))))?;
        return array
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let item_path = format!("{path}[{i}]");
                if v.is_null() {
                    return Err(invalid(&item_path, "list items cannot be null"));
                }
                json_to_value(&field.kind(), v, &item_path)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::List);
    }
    json_to_value(&field.kind(), json, path)
}

/// The JSON value of one singular value of `kind`.
fn json_to_value(
    kind: &Kind,
    json: &serde_json::Value,
    path: &str,
) -> Result<Value, TranscodeError> {
    match kind {
        Kind::Message(m) => json_to_message(m, json, path).map(Value::Message),
        Kind::Enum(e) => match json {
            serde_json::Value::String(s) => e
                .get_value_by_name(s)
                .map(|v| Value::EnumNumber(v.number()))
                .ok_or_else(|| {
                    let names = e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>();
                    invalid(
                        path,
                        format!(
                            "unknown {} value {s:?}; expected one of {}",
                            e.name(),
                            names.join(", ")
                        ),
                    )
                }),
            serde_json::Value::Number(n) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Value::EnumNumber)
                .ok_or_else(|| invalid(path, "enum number out of range")),
            serde_json::Value::Null if e.full_name() == "google.protobuf.NullValue" => {
                Ok(Value::EnumNumber(0))
            }
            other => Err(invalid(
                path,
                format!("expected an enum name, got {}", json_type(other)),
            )),
        },
        Kind::String => json
            .as_str()
            .map(|s| Value::String(s.to_owned()))
            .ok_or_else(|| invalid(path, format!("expected a string, got {}", json_type(json)))),
        Kind::Bool => json
            .as_bool()
            .map(Value::Bool)
            .ok_or_else(|| invalid(path, format!("expected a boolean, got {}", json_type(json)))),
        Kind::Bytes => json
            .as_str()
            .and_then(decode_base64)
            .map(|b| Value::Bytes(b.into()))
            .ok_or_else(|| invalid(path, "expected a base64 string")),
        _ => number_from_json(kind, json, path),
    }
}

/// Integers and floats from a JSON number or string.
fn number_from_json(
    kind: &Kind,
    json: &serde_json::Value,
    path: &str,
) -> Result<Value, TranscodeError> {
    let (text, from_string) = match json {
        serde_json::Value::Number(n) => (n.to_string(), false),
        serde_json::Value::String(s) => (s.trim().to_owned(), true),
        other => {
            return Err(invalid(
                path,
                format!("expected a number, got {}", json_type(other)),
            ));
        }
    };
    let float = |text: &str| -> Option<f64> {
        match text {
            "NaN" if from_string => Some(f64::NAN),
            "Infinity" if from_string => Some(f64::INFINITY),
            "-Infinity" if from_string => Some(f64::NEG_INFINITY),
            _ => text.parse::<f64>().ok().filter(|f| f.is_finite()),
        }
    };
    // Integers may be written with a fraction or exponent if integral (1e3).
    let integer = |text: &str| -> Option<i128> {
        text.parse::<i128>().ok().or_else(|| {
            let f = text.parse::<f64>().ok()?;
            (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.9e19).then_some(f as i128)
        })
    };
    let out_of_range = || invalid(path, format!("{text:?} is not a valid {}", kind_name(kind)));
    match kind {
        Kind::Double => float(&text).map(Value::F64).ok_or_else(out_of_range),
        Kind::Float => {
            let f = float(&text).ok_or_else(out_of_range)?;
            if f.is_finite() && (f as f32).is_infinite() {
                return Err(out_of_range());
            }
            Ok(Value::F32(f as f32))
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => integer(&text)
            .and_then(|n| i32::try_from(n).ok())
            .map(Value::I32)
            .ok_or_else(out_of_range),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => integer(&text)
            .and_then(|n| i64::try_from(n).ok())
            .map(Value::I64)
            .ok_or_else(out_of_range),
        Kind::Uint32 | Kind::Fixed32 => integer(&text)
            .and_then(|n| u32::try_from(n).ok())
            .map(Value::U32)
            .ok_or_else(out_of_range),
        Kind::Uint64 | Kind::Fixed64 => integer(&text)
            .and_then(|n| u64::try_from(n).ok())
            .map(Value::U64)
            .ok_or_else(out_of_range),
        _ => Err(invalid(path, "not a numeric field")),
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "int32",
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "int64",
        Kind::Uint32 | Kind::Fixed32 => "uint32",
        Kind::Uint64 | Kind::Fixed64 => "uint64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(_) => "message",
        Kind::Enum(_) => "enum",
    }
}

/// Well-known types (Timestamp, Duration, FieldMask, Struct, wrappers, ...)
/// through prost-reflect's proto3 JSON mapping.
fn well_known_from_json(
    desc: &MessageDescriptor,
    json: &serde_json::Value,
    path: &str,
) -> Result<Value, TranscodeError> {
    DynamicMessage::deserialize(desc.clone(), json)
        .map(Value::Message)
        .map_err(|e| {
            let hint = match desc.full_name() {
                "google.protobuf.Timestamp" => {
                    "expected an RFC 3339 timestamp such as \"2025-11-28T09:00:00Z\""
                }
                "google.protobuf.Duration" => "expected a duration such as \"1.5s\"",
                "google.protobuf.FieldMask" => {
                    "expected comma-separated field paths such as \"name,priceCents\""
                }
                _ => "invalid value",
            };
            invalid(path, format!("{hint} ({e})"))
        })
}

/// Percent-decodes `raw`; `plus_as_space` for query strings, `keep_slash`
/// leaves `%2F` encoded (multi-segment path variables). `None` if the result
/// is not UTF-8. Invalid escapes are kept literally.
fn percent_decode(raw: &str, plus_as_space: bool, keep_slash: bool) -> Option<String> {
    if !raw.contains(['%', '+']) {
        return Some(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_as_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        let decoded = (h * 16 + l) as u8;
                        if keep_slash && decoded == b'/' {
                            out.extend_from_slice(&bytes[i..i + 3]);
                        } else {
                            out.push(decoded);
                        }
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Standard or URL-safe base64, padding optional.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// gRPC codec
// ---------------------------------------------------------------------------

/// A tonic codec sending [`DynamicMessage`]s and receiving answers as
/// their wire bytes (rendered by the route's [`WireJson`]), for
/// `tonic::client::Grpc::unary` / `server_streaming`.
#[derive(Debug, Clone, Default)]
pub struct GatewayCodec;

impl Codec for GatewayCodec {
    type Encode = DynamicMessage;
    type Decode = Bytes;
    type Encoder = DynamicEncoder;
    type Decoder = WireDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder
    }
}

/// The gateway's messages are small (a deal, a user, an order) and an event
/// stream may stay open for hours, so each call starts with 1 KiB of buffer
/// instead of tonic's 8 KiB and grows by that much when a message is bigger.
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// Encoder half of [`GatewayCodec`].
#[derive(Debug, Clone, Default)]
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

/// Decoder half of [`GatewayCodec`]: one message's bytes, as they came.
#[derive(Debug, Clone, Default)]
pub struct WireDecoder;

impl Decoder for WireDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(flashmesh_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    fn table() -> RouteTable {
        RouteTable::from_descriptors(&pool(), &[]).unwrap()
    }

    fn found<'a>(
        table: &'a RouteTable,
        method: Method,
        path: &str,
    ) -> (&'a Route, Vec<(String, String)>) {
        match table.lookup(&method, path) {
            RouteLookup::Found { route, params } => (route, params),
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    fn request(
        method: Method,
        path: &str,
        query: Option<&str>,
        body: &str,
    ) -> Result<DynamicMessage, TranscodeError> {
        let table = table();
        let (route, params) = found(&table, method, path);
        build_request(route, &params, query, body.as_bytes())
    }

    fn field(msg: &DynamicMessage, name: &str) -> Value {
        msg.get_field_by_name(name).unwrap().into_owned()
    }

    #[test]
    fn table_has_every_annotated_rpc() {
        let table = table();
        let rpcs: Vec<&str> = table.routes().map(|r| r.method.name()).collect();
        for rpc in [
            "SignUp",
            "Login",
            "Refresh",
            "Logout",
            "GetJwks",
            "GetMe",
            "CreateProduct",
            "GetProduct",
            "ListProducts",
            "UpdateProduct",
            "CreateDeal",
            "GetDeal",
            "ListDeals",
            "WatchDeal",
            "PlaceOrder",
            "GetOrder",
            "ListOrders",
            "CancelOrder",
            "WatchOrder",
            "GetDealSales",
        ] {
            assert!(rpcs.contains(&rpc), "{rpc} missing from {rpcs:?}");
        }
        // Internal RPCs have no HTTP mapping.
        assert!(!rpcs.contains(&"ReserveStock"));
        assert!(!rpcs.contains(&"ReleaseStock"));
    }

    #[test]
    fn service_filter() {
        let table =
            RouteTable::from_descriptors(&pool(), &["flashmesh.order.v1.OrderService"]).unwrap();
        assert!(
            table
                .routes()
                .all(|r| r.service == "flashmesh.order.v1.OrderService")
        );
        assert_eq!(table.routes().count(), 6);
        assert!(matches!(
            RouteTable::from_descriptors(&pool(), &["nope.Service"]),
            Err(RouteError::UnknownService(s)) if s == "nope.Service"
        ));
    }

    #[test]
    fn routes_place_get_and_cancel_order() {
        let table = table();
        let (route, params) = found(&table, Method::POST, "/v1/orders");
        assert_eq!(route.method.name(), "PlaceOrder");
        assert_eq!(route.body, BodySpec::Whole);
        assert_eq!(
            route.grpc_path.as_str(),
            "/flashmesh.order.v1.OrderService/PlaceOrder"
        );
        assert_eq!(route.service, "flashmesh.order.v1.OrderService");
        assert!(!route.server_streaming);
        assert!(params.is_empty());

        let (route, params) = found(&table, Method::GET, "/v1/orders/abc");
        assert_eq!(route.method.name(), "GetOrder");
        assert_eq!(route.body, BodySpec::None);
        assert_eq!(params, vec![("id".to_owned(), "abc".to_owned())]);

        let (route, params) = found(&table, Method::POST, "/v1/orders/abc:cancel");
        assert_eq!(route.method.name(), "CancelOrder");
        assert_eq!(route.template, "/v1/orders/{id}:cancel");
        assert_eq!(
            route.grpc_path.as_str(),
            "/flashmesh.order.v1.OrderService/CancelOrder"
        );
        assert_eq!(params, vec![("id".to_owned(), "abc".to_owned())]);
    }

    #[test]
    fn routes_streaming_and_sibling_variables() {
        let table = table();
        let (route, params) = found(&table, Method::GET, "/v1/deals/d1/events");
        assert_eq!(route.method.name(), "WatchDeal");
        assert!(route.server_streaming);
        assert_eq!(params, vec![("id".to_owned(), "d1".to_owned())]);

        // Same position, different field name ({deal_id} vs {id}).
        let (route, params) = found(&table, Method::GET, "/v1/deals/d1/sales");
        assert_eq!(route.method.name(), "GetDealSales");
        assert_eq!(params, vec![("deal_id".to_owned(), "d1".to_owned())]);

        let (route, _) = found(&table, Method::GET, "/v1/deals/d1");
        assert_eq!(route.method.name(), "GetDeal");
    }

    #[test]
    fn path_variables_are_percent_decoded() {
        let table = table();
        let (_, params) = found(&table, Method::GET, "/v1/orders/a%20b%2Fc");
        assert_eq!(params, vec![("id".to_owned(), "a b/c".to_owned())]);
        // The query string is not part of the path.
        let (route, _) = found(&table, Method::GET, "/v1/deals?page_size=1");
        assert_eq!(route.method.name(), "ListDeals");
    }

    #[test]
    fn wrong_method_and_unknown_path() {
        let table = table();
        match table.lookup(&Method::DELETE, "/v1/orders") {
            RouteLookup::MethodNotAllowed { allowed } => {
                assert_eq!(allowed, vec![Method::GET, Method::POST])
            }
            other => panic!("{other:?}"),
        }
        match table.lookup(&Method::PUT, "/v1/products/p1") {
            RouteLookup::MethodNotAllowed { allowed } => {
                assert_eq!(allowed, vec![Method::GET, Method::PATCH])
            }
            other => panic!("{other:?}"),
        }
        match table.lookup(&Method::GET, "/v1/orders/abc:cancel") {
            // GET /v1/orders/{id} takes any id, so this is GetOrder("abc:cancel").
            RouteLookup::Found { route, params } => {
                assert_eq!(route.method.name(), "GetOrder");
                assert_eq!(params[0].1, "abc:cancel");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.lookup(&Method::GET, "/v1/nope"),
            RouteLookup::NotFound
        ));
        assert!(matches!(
            table.lookup(&Method::GET, "/v1/orders/a/b"),
            RouteLookup::NotFound
        ));
        assert!(matches!(
            table.lookup(&Method::GET, ""),
            RouteLookup::NotFound
        ));
    }

    #[test]
    fn template_parsing() {
        let t = parse_template("/v1/orders/{id}:cancel").unwrap();
        assert_eq!(t.matchit_path, "/v1/orders/{p0}:cancel");
        let t = parse_template("/v1/{name=shelves/*/books/*}").unwrap();
        assert_eq!(t.matchit_path, "/v1/shelves/{p0}/books/{p1}");
        let t = parse_template("/v1/{name=files/**}").unwrap();
        assert_eq!(t.matchit_path, "/v1/files/{*p0}");
        let t = parse_template("/v1/*/x").unwrap();
        assert_eq!(t.matchit_path, "/v1/{p0}/x");
        assert!(parse_template("v1/x").is_err());
        assert!(parse_template("/v1/{id").is_err());
        assert!(parse_template("/v1/**/x").is_err());
        assert!(parse_template("/v1//x").is_err());
        assert!(parse_template("/v1/{a.b-c}").is_err());
        assert!(parse_template("/v1/{p=**}:verb").is_err());
    }

    #[test]
    fn place_order_snake_and_camel_case() {
        for body in [
            r#"{"deal_id":"x","quantity":2,"idempotency_key":"k"}"#,
            r#"{"dealId":"x","quantity":"2","idempotencyKey":"k"}"#,
        ] {
            let msg = request(Method::POST, "/v1/orders", None, body).unwrap();
            assert_eq!(
                msg.descriptor().full_name(),
                "flashmesh.order.v1.PlaceOrderRequest"
            );
            assert_eq!(field(&msg, "deal_id"), Value::String("x".into()));
            assert_eq!(field(&msg, "quantity"), Value::I32(2));
            assert_eq!(field(&msg, "idempotency_key"), Value::String("k".into()));
        }
    }

    #[test]
    fn both_names_for_one_field_is_an_error() {
        let err = request(
            Method::POST,
            "/v1/orders",
            None,
            r#"{"deal_id":"x","dealId":"y"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, TranscodeError::Duplicate { .. }), "{err:?}");
        assert_eq!(err.field(), "deal_id");
    }

    #[test]
    fn int64_as_string_or_number() {
        for body in [
            r#"{"name":"Kettle","price_cents":"12900"}"#,
            r#"{"name":"Kettle","priceCents":12900}"#,
        ] {
            let msg = request(Method::POST, "/v1/products", None, body).unwrap();
            assert_eq!(field(&msg, "price_cents"), Value::I64(12900));
        }
        let big = request(
            Method::POST,
            "/v1/products",
            None,
            r#"{"price_cents":"9223372036854775807"}"#,
        )
        .unwrap();
        assert_eq!(field(&big, "price_cents"), Value::I64(i64::MAX));
        let err = request(
            Method::POST,
            "/v1/products",
            None,
            r#"{"price_cents":"12.5"}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "price_cents");
        let err = request(
            Method::POST,
            "/v1/products",
            None,
            r#"{"price_cents":"9223372036854775808"}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "price_cents");
        let err = request(
            Method::POST,
            "/v1/orders",
            None,
            r#"{"quantity":3000000000}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "quantity");
        assert!(err.description().contains("int32"), "{}", err.description());
        let err = request(Method::POST, "/v1/orders", None, r#"{"quantity":true}"#).unwrap_err();
        assert_eq!(err.field(), "quantity");
    }

    #[test]
    fn create_deal_timestamps() {
        let msg = request(
            Method::POST,
            "/v1/deals",
            None,
            r#"{"product_id":"p","priceCents":"500","stock":10,"per_user_limit":2,
                "starts_at":"2025-11-28T09:00:00Z","endsAt":"2025-11-28T10:30:00.5+01:00"}"#,
        )
        .unwrap();
        let starts = match field(&msg, "starts_at") {
            Value::Message(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&starts, "seconds"), Value::I64(1_764_320_400));
        let ends = match field(&msg, "ends_at") {
            Value::Message(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&ends, "seconds"), Value::I64(1_764_320_400 + 1800));
        assert_eq!(field(&ends, "nanos"), Value::I32(500_000_000));

        let err = request(
            Method::POST,
            "/v1/deals",
            None,
            r#"{"starts_at":"tomorrow"}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "starts_at");
        assert!(
            err.description().contains("RFC 3339"),
            "{}",
            err.description()
        );
    }

    #[test]
    fn unknown_body_field_is_named() {
        let err = request(
            Method::POST,
            "/v1/orders",
            None,
            r#"{"deal_id":"x","qty":2}"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, TranscodeError::UnknownField { .. }),
            "{err:?}"
        );
        assert_eq!(err.field(), "qty");
        assert_eq!(err.description(), "unknown field");
    }

    #[test]
    fn wrong_shapes() {
        let err = request(Method::POST, "/v1/orders", None, "[1,2]").unwrap_err();
        assert_eq!(err.field(), "body");
        let err = request(Method::POST, "/v1/orders", None, r#"{"deal_id":5}"#).unwrap_err();
        assert_eq!(err.field(), "deal_id");
        assert!(err.description().contains("expected a string"));
        // null leaves a field unset.
        let msg = request(Method::POST, "/v1/orders", None, r#"{"deal_id":null}"#).unwrap();
        assert_eq!(field(&msg, "deal_id"), Value::String(String::new()));
    }

    #[test]
    fn malformed_json() {
        let err =
            request(Method::POST, "/v1/orders", None, "{\n\"deal_id\": \"x\",,}").unwrap_err();
        match &err {
            TranscodeError::MalformedJson { line, column, .. } => {
                assert_eq!(*line, 2);
                assert!(*column > 0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.field(), "body");
        assert!(err.description().contains("line 2"));
    }

    #[test]
    fn deep_nesting_is_rejected_before_parsing() {
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let err = request(Method::POST, "/v1/orders", None, &deep).unwrap_err();
        assert!(
            matches!(err, TranscodeError::TooDeep { max: 32 }),
            "{err:?}"
        );
        assert_eq!(err.field(), "body");
        // Brackets inside strings do not count.
        let body = format!(r#"{{"deal_id":"{}"}}"#, "[{".repeat(40));
        assert!(request(Method::POST, "/v1/orders", None, &body).is_ok());
        // 32 levels are fine as far as depth goes.
        assert!(check_depth(format!("{}{}", "[".repeat(32), "]".repeat(32)).as_bytes()).is_ok());
        assert!(check_depth(format!("{}{}", "[".repeat(33), "]".repeat(33)).as_bytes()).is_err());
    }

    #[test]
    fn body_on_a_route_without_body() {
        let err = request(Method::GET, "/v1/orders/o1", None, r#"{"id":"x"}"#).unwrap_err();
        assert!(matches!(err, TranscodeError::BodyNotAllowed));
        assert_eq!(err.field(), "body");
        // Whitespace is not a body.
        assert!(request(Method::GET, "/v1/orders/o1", None, " \n").is_ok());
    }

    #[test]
    fn path_params_fill_fields() {
        let msg = request(Method::POST, "/v1/orders/o1:cancel", None, "").unwrap();
        assert_eq!(
            msg.descriptor().full_name(),
            "flashmesh.order.v1.CancelOrderRequest"
        );
        assert_eq!(field(&msg, "id"), Value::String("o1".into()));
        // The same value in the body is fine; a different one is not.
        assert!(request(Method::POST, "/v1/orders/o1:cancel", None, r#"{"id":"o1"}"#).is_ok());
        let err =
            request(Method::POST, "/v1/orders/o1:cancel", None, r#"{"id":"o2"}"#).unwrap_err();
        assert_eq!(err.field(), "id");

        let msg = request(
            Method::PATCH,
            "/v1/products/p1",
            None,
            r#"{"update_mask":"name,priceCents","name":"N"}"#,
        )
        .unwrap();
        assert_eq!(field(&msg, "id"), Value::String("p1".into()));
        let mask = match field(&msg, "update_mask") {
            Value::Message(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(&mask, "paths"),
            Value::List(vec![
                Value::String("name".into()),
                Value::String("price_cents".into())
            ])
        );
    }

    #[test]
    fn list_deals_query() {
        let msg = request(
            Method::GET,
            "/v1/deals",
            Some("states=DEAL_STATE_ACTIVE&states=DEAL_STATE_SCHEDULED&page_size=5"),
            "",
        )
        .unwrap();
        assert_eq!(
            field(&msg, "states"),
            Value::List(vec![Value::EnumNumber(2), Value::EnumNumber(1)])
        );
        assert_eq!(field(&msg, "page_size"), Value::I32(5));

        // Enums by number, JSON names, percent/plus decoding.
        let msg = request(
            Method::GET,
            "/v1/deals",
            Some("states=3&productId=a+b%21&pageToken=t%3D"),
            "",
        )
        .unwrap();
        assert_eq!(
            field(&msg, "states"),
            Value::List(vec![Value::EnumNumber(3)])
        );
        assert_eq!(field(&msg, "product_id"), Value::String("a b!".into()));
        assert_eq!(field(&msg, "page_token"), Value::String("t=".into()));
    }

    #[test]
    fn query_errors() {
        let err =
            request(Method::GET, "/v1/deals", Some("states=DEAL_STATE_NOPE"), "").unwrap_err();
        assert_eq!(err.field(), "states");
        assert!(
            err.description().contains("DEAL_STATE_ACTIVE"),
            "{}",
            err.description()
        );
        let err = request(Method::GET, "/v1/deals", Some("page_size=five"), "").unwrap_err();
        assert_eq!(err.field(), "page_size");
        let err = request(
            Method::GET,
            "/v1/deals",
            Some("page_size=1&page_size=2"),
            "",
        )
        .unwrap_err();
        assert!(matches!(err, TranscodeError::Duplicate { .. }));
        assert_eq!(err.field(), "page_size");
        let err = request(Method::GET, "/v1/deals", Some("colour=red"), "").unwrap_err();
        assert!(matches!(
            err,
            TranscodeError::UnknownField {
                location: "query parameter",
                ..
            }
        ));
        assert_eq!(err.field(), "colour");
        // A path-bound field cannot be overridden from the query.
        let err = request(Method::GET, "/v1/orders/o1", Some("id=o2"), "").unwrap_err();
        assert_eq!(err.field(), "id");
        // Body "*" routes take nothing from the query.
        let err = request(Method::POST, "/v1/orders", Some("quantity=2"), "{}").unwrap_err();
        assert_eq!(err.field(), "quantity");
    }

    #[test]
    fn codec_round_trip() {
        use bytes::{Buf, BytesMut};
        let table = table();
        let (route, params) = found(&table, Method::GET, "/v1/orders/o1");
        let request = build_request(route, &params, None, b"").unwrap();
        let bytes = request.encode_to_vec();
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = DynamicMessage::decode(route.method.input(), &mut buf).unwrap();
        assert_eq!(field(&decoded, "id"), Value::String("o1".into()));
        assert_eq!(buf.remaining(), 0);

        fn assert_codec<
            C: Codec<Encode = DynamicMessage, Decode = Bytes> + Clone + Send + 'static,
        >(
            _: C,
        ) {
        }
        assert_codec(GatewayCodec);
        assert_eq!(
            format!("{:?}", route.answer),
            r#"WireJson("flashmesh.order.v1.GetOrderResponse")"#
        );
    }

    #[test]
    fn conflicting_templates_name_the_rpc() {
        let mut table = table();
        let pool = pool();
        let method = pool
            .get_service_by_name("flashmesh.order.v1.OrderService")
            .unwrap()
            .methods()
            .find(|m| m.name() == "GetOrder")
            .unwrap();
        let rule_desc = pool.get_message_by_name("google.api.HttpRule").unwrap();
        let mut rule = DynamicMessage::new(rule_desc);
        rule.set_field_by_name("get", Value::String("/v1/orders/{id}".into()));
        let err = table.add_rule(&method, &rule, true).unwrap_err();
        assert!(matches!(err, RouteError::Conflict { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("flashmesh.order.v1.OrderService.GetOrder"),
            "{err}"
        );

        rule.set_field_by_name("get", Value::String("/v1/x/{nope}".into()));
        let err = table.add_rule(&method, &rule, true).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn helpers() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert_eq!(decode_base64("-_8").unwrap(), vec![0xfb, 0xff]);
        assert!(decode_base64("a").is_none());
        assert_eq!(percent_decode("a%2Fb", false, true).unwrap(), "a%2Fb");
        assert_eq!(percent_decode("100%", false, false).unwrap(), "100%");
        assert_eq!(percent_decode("%zz", false, false).unwrap(), "%zz");
        assert!(percent_decode("%ff", false, false).is_none());
    }
}
