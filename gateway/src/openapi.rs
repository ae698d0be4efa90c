//! The OpenAPI 3.1 description of every transcoded route, derived from the
//! same descriptors and annotations the gateway routes by, plus a plain HTML
//! page listing the operations (no scripts, no CDN: it works offline).
//!
//! The schemas describe what the gateway really accepts and emits (see
//! [`crate::transcode`]), which differs by direction, so a message used both
//! in requests and in responses gets two schemas:
//!
//! * Responses (`<full message name>`): proto field names; every field
//!   without presence (scalars, enums, repeated, maps) is always emitted and
//!   so `required`; message fields and proto3 `optional` fields appear only
//!   when set. 64-bit integers are decimal strings, enums names, Timestamps
//!   RFC 3339 strings, bytes base64.
//! * Requests (`<full message name>`, or `<full message name>-Input` when the
//!   message also appears in responses): proto field names, nothing required,
//!   unknown fields rejected (`additionalProperties: false`), `null` allowed
//!   everywhere (it leaves the field unset), integers as numbers or decimal
//!   strings, enums as names or numbers. lowerCamelCase JSON names are
//!   accepted too but are not listed, so generated clients use one spelling.

use std::collections::{BTreeSet, HashMap, HashSet};

use prost_reflect::{EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::transcode::{BodySpec, Route, RouteTable};

/// Where the wiring serves [`document`].
pub const DOCUMENT_PATH: &str = "/openapi.json";

/// Where the wiring serves [`docs_page`].
pub const DOCS_PATH: &str = "/docs";

/// The media type of [`document`] (`application/json` works too).
pub const OPENAPI_MEDIA_TYPE: &str = "application/vnd.oai.openapi+json;version=3.1";

/// The security scheme every non-public operation requires.
const BEARER: &str = "bearerAuth";

const SCHEMA_PREFIX: &str = "#/components/schemas/";

/// Error responses every operation may answer, all problem+json:
/// (status, component name, description).
const ERROR_RESPONSES: &[(&str, &str, &str)] = &[
    (
        "400",
        "BadRequest",
        "The request is invalid: malformed JSON, an unknown field or query parameter, a value of \
         the wrong type or out of range, or input the service rejected. `errors` names each \
         offending field.",
    ),
    (
        "401",
        "Unauthorized",
        "No bearer token, or one that is malformed, expired or not valid (`code` TOKEN_MISSING, \
         TOKEN_INVALID, TOKEN_EXPIRED).",
    ),
    (
        "403",
        "Forbidden",
        "The token is valid but its holder may not do this (e.g. `code` ADMIN_REQUIRED).",
    ),
    (
        "404",
        "NotFound",
        "The resource does not exist or is not the caller's, or no route matches the path \
         (`code` ROUTE_NOT_FOUND).",
    ),
    (
        "409",
        "Conflict",
        "The resource's state does not allow this (e.g. SOLD_OUT, DEAL_NOT_ACTIVE, \
         LIMIT_EXCEEDED, IDEMPOTENCY_KEY_REUSED), or the same request is still in progress.",
    ),
    (
        "413",
        "PayloadTooLarge",
        "The request body exceeds the gateway's limit.",
    ),
    (
        "415",
        "UnsupportedMediaType",
        "A request body that is not `application/json`.",
    ),
    (
        "429",
        "TooManyRequests",
        "Rate limited, per client address and per user; retry after `Retry-After` seconds.",
    ),
    (
        "500",
        "InternalError",
        "An unexpected fault; the detail never carries internals.",
    ),
    (
        "503",
        "Unavailable",
        "The upstream service is unavailable, busy or shedding load; retry with backoff \
         (`Retry-After` when known).",
    ),
    (
        "504",
        "GatewayTimeout",
        "The upstream service did not answer within the deadline.",
    ),
];

/// The OpenAPI 3.1 document for every route in `routes`.
///
/// Operations whose RPC (`pkg.Service/Method`) is in `public` have
/// `security: []`; the rest require the `bearerAuth` JWT scheme. The server
/// list is `server_url` when given, else empty (relative to the document).
pub fn document(routes: &RouteTable, public: &HashSet<String>, server_url: Option<&str>) -> Value {
    let routes: Vec<&Route> = routes.routes().collect();
    let mut builder = Builder::new(&routes);

    let operation_ids = operation_ids(&routes);
    let mut paths = Map::new();
    let mut tags: Vec<(String, Option<String>)> = Vec::new();
    for (index, route) in routes.iter().enumerate() {
        let service = route.method.parent_service();
        if !tags.iter().any(|(name, _)| name == service.name()) {
            tags.push((
                service.name().to_owned(),
                comments(&service.parent_file(), service.path()),
            ));
        }
        let operation = builder.operation(route, index, &routes, &operation_ids, public);
        let path = openapi_path(route);
        let item = paths
            .entry(path)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(item) = item {
            item.insert(route.http_method.as_str().to_ascii_lowercase(), operation);
        }
    }

    let mut schemas = Map::new();
    schemas.insert("Problem".to_owned(), problem_schema());
    schemas.extend(std::mem::take(&mut builder.schemas));

    let mut responses = Map::new();
    for (_, name, description) in ERROR_RESPONSES {
        responses.insert((*name).to_owned(), problem_response(name, description));
    }
    responses.insert(
        "Error".to_owned(),
        problem_response(
            "Error",
            "Any other failure (e.g. 405 for a method the path does not support, 501), as \
             problem+json.",
        ),
    );

    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "flashmesh API",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Flash sales: accounts, products and deals, orders.",
            "description": API_DESCRIPTION,
        },
        "tags": tags.into_iter().map(|(name, description)| {
            let mut tag = json!({ "name": name });
            if let Some(description) = description {
                tag["description"] = Value::String(description);
            }
            tag
        }).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from POST /v1/auth/login, /v1/auth/signup or /v1/auth/refresh (`tokens.access_token`), sent as `Authorization: Bearer <token>`.",
                }
            },
        },
        "security": [{ BEARER: [] }],
    });
    if let Some(url) = server_url {
        doc["servers"] = json!([{ "url": url }]);
    }
    doc
}

const API_DESCRIPTION: &str = "\
The flashmesh edge gateway transcodes these REST/JSON routes to the services' gRPC methods, \
as annotated in the contracts (`google.api.http`).

**JSON.** Responses use proto field names (`deal_id`) and include fields at their zero value \
(`0`, `\"\"`, `false`, `[]`, `{}`); unset message fields and unset optional fields are omitted. \
64-bit integers are decimal strings (`\"12900\"`), enums their value names, timestamps RFC 3339 \
strings, bytes base64. Requests accept proto or lowerCamelCase names, integers as numbers or \
strings, enums by name or number; `null` leaves a field unset; unknown fields are rejected.

**Query strings.** GET routes take the request's fields as query parameters: repeated fields \
by repeating the key (`states=A&states=B`), nested fields by dotted names.

**Errors** are RFC 9457 `application/problem+json` documents with a stable `code` to branch on \
and, for invalid input, `errors` naming each field.

**Streams.** Server-streaming routes answer `text/event-stream` (one `data:` event per message, \
`id:` counting from 1, an `event: error` carrying a problem if the stream fails, comment \
heartbeats), or `application/x-ndjson` (one JSON message per line) when the request's `Accept` \
asks for it.

**Idempotency.** Where the request has an `idempotency_key`, the `Idempotency-Key` header fills \
it when the body leaves it empty.";

/// Which way a message travels; the gateway's JSON differs by direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    Request,
    Response,
}

struct Builder {
    schemas: Map<String, Value>,
    /// Schema names already emitted (or being emitted).
    emitted: HashSet<String>,
    /// Messages that appear in both requests and responses.
    both: HashSet<String>,
}

impl Builder {
    fn new(routes: &[&Route]) -> Self {
        let mut requests = BTreeSet::new();
        let mut responses = BTreeSet::new();
        for route in routes {
            let input = route.method.input();
            match &route.body {
                BodySpec::None => {}
                BodySpec::Whole => {
                    // The body schema may be inlined (path fields removed):
                    // count the input and everything under it.
                    reachable(&input, &mut requests);
                }
                BodySpec::Field(name) => {
                    if let Some(message) =
                        input.get_field_by_name(name).and_then(|f| message_of(&f))
                    {
                        reachable(&message, &mut requests);
                    }
                }
            }
            reachable(&route.method.output(), &mut responses);
        }
        Self {
            schemas: Map::new(),
            emitted: HashSet::new(),
            both: requests.intersection(&responses).cloned().collect(),
        }
    }

    fn operation(
        &mut self,
        route: &Route,
        index: usize,
        routes: &[&Route],
        operation_ids: &[String],
        public: &HashSet<String>,
    ) -> Value {
        let method = &route.method;
        let rpc = route.rpc();
        let doc = comments(&method.parent_file(), method.path());
        let summary = doc
            .as_deref()
            .map(first_sentence)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| method.name().to_owned());
        let mut description = doc.unwrap_or_default();
        if !description.is_empty() {
            description.push_str("\n\n");
        }
        description.push_str(&format!("gRPC: `{rpc}`."));

        let mut operation = json!({
            "operationId": operation_ids[index],
            "summary": summary,
            "description": description,
            "tags": [method.parent_service().name()],
            "x-grpc-method": rpc,
        });

        let mut parameters = self.path_parameters(route);
        if route.body != BodySpec::Whole {
            parameters.extend(self.query_parameters(route));
        }
        if route.body != BodySpec::None
            && method
                .input()
                .get_field_by_name("idempotency_key")
                .is_some_and(|f| f.kind() == Kind::String && !f.is_list())
        {
            parameters.push(json!({
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "description": "Fills `idempotency_key` when the body leaves it empty.",
                "schema": { "type": "string" },
            }));
        }
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }

        if let Some(body) = self.request_body(route) {
            operation["requestBody"] = body;
        }

        let mut responses = Map::new();
        responses.insert(
            "200".to_owned(),
            self.success_response(route, routes, operation_ids),
        );
        for (status, name, _) in ERROR_RESPONSES {
            responses.insert(
                (*status).to_owned(),
                json!({ "$ref": format!("#/components/responses/{name}") }),
            );
        }
        responses.insert(
            "default".to_owned(),
            json!({ "$ref": "#/components/responses/Error" }),
        );
        operation["responses"] = Value::Object(responses);

        operation["security"] = if public.contains(rpc) {
            json!([])
        } else {
            json!([{ BEARER: [] }])
        };
        operation
    }

    fn path_parameters(&mut self, route: &Route) -> Vec<Value> {
        let input = route.method.input();
        let patterns = template_vars(&route.template);
        route
            .path_fields
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let leaf = resolve(&input, path);
                let mut schema = leaf
                    .as_ref()
                    .and_then(|f| self.param_value_schema(f))
                    .unwrap_or_else(|| json!({ "type": "string" }));
                if schema.get("type").and_then(Value::as_str) == Some("string")
                    && schema.get("pattern").is_none()
                    && schema.get("format").is_none()
                {
                    schema["minLength"] = json!(1);
                }
                let mut parameter = json!({
                    "name": path,
                    "in": "path",
                    "required": true,
                    "schema": schema,
                });
                let mut description = leaf
                    .as_ref()
                    .and_then(|f| comments(&f.parent_file(), f.path()))
                    .unwrap_or_default();
                if let Some(Some(pattern)) = patterns.get(i)
                    && pattern != "*"
                {
                    if !description.is_empty() {
                        description.push_str("\n\n");
                    }
                    description.push_str(&format!("Matches the path pattern `{pattern}`."));
                }
                if !description.is_empty() {
                    parameter["description"] = Value::String(description);
                }
                parameter
            })
            .collect()
    }

    fn query_parameters(&mut self, route: &Route) -> Vec<Value> {
        let body_field = match &route.body {
            BodySpec::Field(name) => Some(name.as_str()),
            _ => None,
        };
        let mut out = Vec::new();
        let mut stack = Vec::new();
        self.collect_query(
            &route.method.input(),
            "",
            &route.path_fields,
            body_field,
            &mut stack,
            &mut out,
        );
        out
    }

    fn collect_query(
        &mut self,
        message: &MessageDescriptor,
        prefix: &str,
        path_fields: &[String],
        body_field: Option<&str>,
        stack: &mut Vec<String>,
        out: &mut Vec<Value>,
    ) {
        if stack.iter().any(|m| m == message.full_name()) || stack.len() >= 8 {
            return;
        }
        stack.push(message.full_name().to_owned());
        for field in message.fields() {
            if prefix.is_empty() && body_field == Some(field.name()) {
                continue;
            }
            let path = if prefix.is_empty() {
                field.name().to_owned()
            } else {
                format!("{prefix}.{}", field.name())
            };
            if path_fields.contains(&path) || field.is_map() {
                continue;
            }
            if let Some(schema) = self.param_schema(&field) {
                let mut parameter = json!({
                    "name": path,
                    "in": "query",
                    "required": false,
                    "schema": schema,
                });
                if field.is_list() {
                    parameter["style"] = json!("form");
                    parameter["explode"] = json!(true);
                }
                if let Some(description) = comments(&field.parent_file(), field.path()) {
                    parameter["description"] = Value::String(description);
                }
                out.push(parameter);
            } else if let Kind::Message(nested) = field.kind()
                && !field.is_list()
                && !nested.full_name().starts_with("google.protobuf.")
            {
                self.collect_query(&nested, &path, path_fields, body_field, stack, out);
            }
        }
        stack.pop();
    }

    /// The schema of a field set from a query or path string; `None` for
    /// fields that cannot be (messages other than string-form well-known
    /// types, maps, repeated messages).
    fn param_schema(&mut self, field: &FieldDescriptor) -> Option<Value> {
        if field.is_map() {
            return None;
        }
        let item = self.param_value_schema(field)?;
        Some(if field.is_list() {
            json!({ "type": "array", "items": item })
        } else {
            item
        })
    }

    fn param_value_schema(&mut self, field: &FieldDescriptor) -> Option<Value> {
        let kind = match field.kind() {
            Kind::Message(m) => match wrapper_kind(&m) {
                Some(inner) => inner,
                None => {
                    return match m.full_name() {
                        "google.protobuf.Timestamp"
                        | "google.protobuf.Duration"
                        | "google.protobuf.FieldMask" => well_known(&m, Dir::Request),
                        _ => None,
                    };
                }
            },
            kind => kind,
        };
        Some(match kind {
            Kind::Double | Kind::Float => json!({ "type": "number" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                integer(i128::from(i32::MIN), i128::from(i32::MAX))
            }
            Kind::Uint32 | Kind::Fixed32 => integer(0, i128::from(u32::MAX)),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                integer(i128::from(i64::MIN), i128::from(i64::MAX))
            }
            Kind::Uint64 | Kind::Fixed64 => integer(0, i128::from(u64::MAX)),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => bytes_schema(Dir::Request),
            Kind::Enum(e) => self.enum_schema(&e, Dir::Request),
            Kind::Message(_) => return None,
        })
    }

    fn request_body(&mut self, route: &Route) -> Option<Value> {
        let input = route.method.input();
        let (schema, description) = match &route.body {
            BodySpec::None => return None,
            BodySpec::Whole => {
                let bound: Vec<&str> = route
                    .path_fields
                    .iter()
                    .filter(|p| !p.contains('.'))
                    .map(String::as_str)
                    .collect();
                let schema = if bound.is_empty() {
                    self.message_ref(&input, Dir::Request)
                } else {
                    // The path-bound fields come from the URL (a body value
                    // must agree with it): leave them out of the body.
                    self.message_schema(&input, Dir::Request, &bound)
                };
                (
                    schema,
                    format!(
                        "The request message `{}`{}. May be empty.",
                        input.full_name(),
                        if bound.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " without the fields bound by the path ({})",
                                bound.join(", ")
                            )
                        }
                    ),
                )
            }
            BodySpec::Field(name) => {
                let field = input.get_field_by_name(name)?;
                (
                    self.field_schema(&field, Dir::Request),
                    format!("The request's `{name}` field. May be empty."),
                )
            }
        };
        Some(json!({
            "description": description,
            "required": false,
            "content": { "application/json": { "schema": schema } },
        }))
    }

    fn success_response(
        &mut self,
        route: &Route,
        routes: &[&Route],
        operation_ids: &[String],
    ) -> Value {
        let output = route.method.output();
        let schema = self.message_ref(&output, Dir::Response);
        if route.server_streaming {
            let sse = format!(
                "Server-sent events: one event per `{}` message, `id:` counting from 1 and `data:` \
                 the message as JSON. If the stream fails after it started, a final `event: error` \
                 carries a problem+json document. Comment lines are heartbeats. The stream ends \
                 when the RPC completes.",
                output.full_name()
            );
            let ndjson = format!(
                "Sent when `Accept` includes `application/x-ndjson`: one `{}` message as JSON per \
                 line; a failure after the stream started is a final problem+json line.",
                output.full_name()
            );
            return json!({
                "description": format!("A stream of `{}` messages.", output.full_name()),
                "content": {
                    "text/event-stream": {
                        "schema": { "type": "string", "description": sse },
                        "x-item-schema": schema,
                    },
                    "application/x-ndjson": {
                        "schema": { "type": "string", "description": ndjson },
                        "x-item-schema": schema,
                    },
                },
            });
        }
        let mut response = json!({
            "description": format!("OK: `{}`.", output.full_name()),
            "content": { "application/json": { "schema": schema } },
        });
        let links = links(route, routes, operation_ids);
        if !links.is_empty() {
            response["links"] = Value::Object(links);
        }
        response
    }

    /// A `$ref` to the message's schema (emitting it first), or the inline
    /// schema of a well-known type.
    fn message_ref(&mut self, message: &MessageDescriptor, dir: Dir) -> Value {
        if let Some(schema) = well_known(message, dir) {
            return schema;
        }
        let name = if dir == Dir::Request && self.both.contains(message.full_name()) {
            format!("{}-Input", message.full_name())
        } else {
            message.full_name().to_owned()
        };
        if self.emitted.insert(name.clone()) {
            let schema = self.message_schema(message, dir, &[]);
            self.schemas.insert(name.clone(), schema);
        }
        json!({ "$ref": format!("{SCHEMA_PREFIX}{name}") })
    }

    fn message_schema(&mut self, message: &MessageDescriptor, dir: Dir, exclude: &[&str]) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in message.fields() {
            if exclude.contains(&field.name()) {
                continue;
            }
            if dir == Dir::Response && !field.supports_presence() {
                required.push(field.name().to_owned());
            }
            properties.insert(field.name().to_owned(), self.field_schema(&field, dir));
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if let Some(description) = comments(&message.parent_file(), message.path()) {
            schema["description"] = Value::String(description);
        }
        match dir {
            Dir::Request => schema["additionalProperties"] = json!(false),
            Dir::Response => {
                if !required.is_empty() {
                    schema["required"] = json!(required);
                }
            }
        }
        schema
    }

    fn field_schema(&mut self, field: &FieldDescriptor, dir: Dir) -> Value {
        let mut schema = if field.is_map() {
            match field.kind() {
                Kind::Message(entry) => {
                    let key = entry.map_entry_key_field();
                    let value = entry.map_entry_value_field();
                    let mut map = json!({
                        "type": "object",
                        "additionalProperties": self.value_schema(&value.kind(), dir),
                    });
                    if let Some(pattern) = map_key_pattern(&key.kind()) {
                        map["propertyNames"] = json!({ "pattern": pattern });
                    }
                    map
                }
                _ => json!({ "type": "object" }),
            }
        } else if field.is_list() {
            json!({ "type": "array", "items": self.value_schema(&field.kind(), dir) })
        } else {
            self.value_schema(&field.kind(), dir)
        };
        if dir == Dir::Request {
            schema = nullable(schema);
        }
        if let Some(description) = comments(&field.parent_file(), field.path())
            && let Value::Object(object) = &mut schema
        {
            object.insert("description".to_owned(), Value::String(description));
        }
        schema
    }

    /// One value of `kind` (a list item, a map value or a singular field).
    fn value_schema(&mut self, kind: &Kind, dir: Dir) -> Value {
        match kind {
            Kind::Double | Kind::Float => match dir {
                Dir::Request => json!({ "anyOf": [
                    { "type": "number" },
                    { "type": "string", "pattern": "^(-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?|NaN|-?Infinity)$" },
                ]}),
                Dir::Response => json!({ "anyOf": [
                    { "type": "number" },
                    { "type": "string", "enum": ["NaN", "Infinity", "-Infinity"] },
                ]}),
            },
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json_integer(i128::from(i32::MIN), i128::from(i32::MAX), false, dir)
            }
            Kind::Uint32 | Kind::Fixed32 => json_integer(0, i128::from(u32::MAX), false, dir),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json_integer(i128::from(i64::MIN), i128::from(i64::MAX), true, dir)
            }
            Kind::Uint64 | Kind::Fixed64 => json_integer(0, i128::from(u64::MAX), true, dir),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => bytes_schema(dir),
            Kind::Enum(e) => self.enum_schema(e, dir),
            Kind::Message(m) => self.message_ref(m, dir),
        }
    }

    /// Responses: a `$ref` to the enum's names. Requests: a name or any
    /// 32-bit number (the gateway passes unknown numbers on).
    fn enum_schema(&mut self, desc: &EnumDescriptor, dir: Dir) -> Value {
        if desc.full_name() == "google.protobuf.NullValue" {
            return json!({ "type": "null" });
        }
        let name = desc.full_name().to_owned();
        if self.emitted.insert(name.clone()) {
            let names: Vec<String> = desc.values().map(|v| v.name().to_owned()).collect();
            let mut schema = json!({ "type": "string", "enum": names });
            let mut description = comments(&desc.parent_file(), desc.path()).unwrap_or_default();
            let values: Vec<String> = desc
                .values()
                .filter_map(|v| {
                    comments(&v.parent_file(), v.path())
                        .map(|c| format!("- `{}`: {}", v.name(), c.replace('\n', " ")))
                })
                .collect();
            if !values.is_empty() {
                if !description.is_empty() {
                    description.push_str("\n\n");
                }
                description.push_str(&values.join("\n"));
            }
            if !description.is_empty() {
                schema["description"] = Value::String(description);
            }
            self.schemas.insert(name.clone(), schema);
        }
        let reference = json!({ "$ref": format!("{SCHEMA_PREFIX}{name}") });
        match dir {
            Dir::Response => reference,
            Dir::Request => json!({ "anyOf": [
                reference,
                integer(i128::from(i32::MIN), i128::from(i32::MAX)),
            ]}),
        }
    }
}

/// Operation ids: the RPC's full name with `.` → `_`, plus `_2`, `_3`, ...
/// for its additional bindings.
fn operation_ids(routes: &[&Route]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    routes
        .iter()
        .map(|route| {
            let base = route.rpc_name().replace('.', "_");
            let n = seen.entry(base.clone()).or_insert(0);
            *n += 1;
            if *n == 1 { base } else { format!("{base}_{n}") }
        })
        .collect()
}

/// OpenAPI links from `route`'s 200 response: for each top-level message
/// field `X` (with an `id`) of the response, every other GET route
/// `.../{id}` whose response has a field `X` of the same type.
fn links(route: &Route, routes: &[&Route], operation_ids: &[String]) -> Map<String, Value> {
    let mut links = Map::new();
    for field in route.method.output().fields() {
        let Kind::Message(resource) = field.kind() else {
            continue;
        };
        if field.is_list() || field.is_map() {
            continue;
        }
        let Some(id) = resource.get_field_by_name("id") else {
            continue;
        };
        if id.is_list() || id.is_map() || matches!(id.kind(), Kind::Message(_)) {
            continue;
        }
        for (target, operation_id) in routes.iter().zip(operation_ids) {
            let fetches = target.http_method == http::Method::GET
                && !target.server_streaming
                && target.method.full_name() != route.method.full_name()
                && target.path_fields == ["id"]
                && target.template.ends_with("/{id}")
                && target
                    .method
                    .output()
                    .get_field_by_name(field.name())
                    .is_some_and(|f| !f.is_list() && !f.is_map() && f.kind() == field.kind());
            if !fetches {
                continue;
            }
            let mut name = target.method.name().to_owned();
            let mut n = 1;
            while links.contains_key(&name) {
                n += 1;
                name = format!("{}{n}", target.method.name());
            }
            links.insert(
                name,
                json!({
                    "operationId": operation_id,
                    "parameters": { "id": format!("$response.body#/{}/id", field.name()) },
                    "description": format!(
                        "The `{}` just returned, by its `id`.",
                        field.name()
                    ),
                }),
            );
        }
    }
    links
}

/// The OpenAPI path of a template: each variable becomes `{field.path}`
/// (its canonical proto name; `{name=shelves/*}` becomes `{name}`).
fn openapi_path(route: &Route) -> String {
    let mut out = String::with_capacity(route.template.len());
    let mut vars = route.path_fields.iter();
    let mut chars = route.template.chars();
    while let Some(c) = chars.next() {
        if c == '{' {
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            let name = vars
                .next()
                .cloned()
                .unwrap_or_else(|| inner.split('=').next().unwrap_or_default().to_owned());
            out.push('{');
            out.push_str(&name);
            out.push('}');
        } else {
            out.push(c);
        }
    }
    out
}

/// Each variable's `=pattern` in the template, in order (`None` for `{x}`).
fn template_vars(template: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c == '{' {
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            out.push(inner.split_once('=').map(|(_, p)| p.to_owned()));
        }
    }
    out
}

/// The leaf field of a dotted path of proto names.
fn resolve(message: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut current = message.clone();
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let field = current.get_field_by_name(segment)?;
        if segments.peek().is_none() {
            return Some(field);
        }
        match field.kind() {
            Kind::Message(m) => current = m,
            _ => return None,
        }
    }
    None
}

/// Every message under `message` whose schema is emitted (not inlined).
fn reachable(message: &MessageDescriptor, out: &mut BTreeSet<String>) {
    if is_inlined(message) || !out.insert(message.full_name().to_owned()) {
        return;
    }
    for field in message.fields() {
        if let Some(nested) = message_of(&field) {
            reachable(&nested, out);
        }
    }
}

/// The message type of a field, or of a map field's values.
fn message_of(field: &FieldDescriptor) -> Option<MessageDescriptor> {
    match field.kind() {
        Kind::Message(entry) if field.is_map() => match entry.map_entry_value_field().kind() {
            Kind::Message(m) => Some(m),
            _ => None,
        },
        Kind::Message(m) => Some(m),
        _ => None,
    }
}

fn is_inlined(message: &MessageDescriptor) -> bool {
    well_known(message, Dir::Response).is_some()
}

fn wrapper_kind(message: &MessageDescriptor) -> Option<Kind> {
    Some(match message.full_name() {
        "google.protobuf.DoubleValue" => Kind::Double,
        "google.protobuf.FloatValue" => Kind::Float,
        "google.protobuf.Int64Value" => Kind::Int64,
        "google.protobuf.UInt64Value" => Kind::Uint64,
        "google.protobuf.Int32Value" => Kind::Int32,
        "google.protobuf.UInt32Value" => Kind::Uint32,
        "google.protobuf.BoolValue" => Kind::Bool,
        "google.protobuf.StringValue" => Kind::String,
        "google.protobuf.BytesValue" => Kind::Bytes,
        _ => return None,
    })
}

/// The JSON form of a well-known type, inlined where it is used.
fn well_known(message: &MessageDescriptor, dir: Dir) -> Option<Value> {
    if let Some(kind) = wrapper_kind(message) {
        // Wrappers are their value's JSON (enums and messages cannot occur).
        return Some(match kind {
            Kind::Double | Kind::Float => match dir {
                Dir::Request => json!({ "anyOf": [
                    { "type": "number" },
                    { "type": "string", "pattern": "^(-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?|NaN|-?Infinity)$" },
                ]}),
                Dir::Response => json!({ "anyOf": [
                    { "type": "number" },
                    { "type": "string", "enum": ["NaN", "Infinity", "-Infinity"] },
                ]}),
            },
            Kind::Int64 => json_integer(i128::from(i64::MIN), i128::from(i64::MAX), true, dir),
            Kind::Uint64 => json_integer(0, i128::from(u64::MAX), true, dir),
            Kind::Int32 => json_integer(i128::from(i32::MIN), i128::from(i32::MAX), false, dir),
            Kind::Uint32 => json_integer(0, i128::from(u32::MAX), false, dir),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::Bytes => bytes_schema(dir),
            _ => json!({ "type": "string" }),
        });
    }
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339, UTC (`Z`) in responses.",
        }),
        "google.protobuf.Duration" => json!({
            "type": "string",
            "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
            "description": "Seconds with an `s` suffix, e.g. `1.5s`.",
        }),
        "google.protobuf.FieldMask" => match dir {
            Dir::Request => json!({
                "type": "string",
                "pattern": "^[^_]*$",
                "description": "Comma-separated field paths in lowerCamelCase, e.g. `name,priceCents`.",
            }),
            Dir::Response => json!({
                "type": "string",
                "description": "Comma-separated field paths in lowerCamelCase.",
            }),
        },
        "google.protobuf.Struct" => json!({ "type": "object" }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array" }),
        "google.protobuf.Empty" => match dir {
            Dir::Request => json!({ "type": "object", "additionalProperties": false }),
            Dir::Response => json!({ "type": "object" }),
        },
        "google.protobuf.Any" => json!({
            "type": "object",
            "required": ["@type"],
            "properties": { "@type": { "type": "string" } },
        }),
        _ => return None,
    })
}

/// An integer as the gateway's JSON has it. Requests take a number or a
/// decimal string; responses emit 64-bit integers as strings.
fn json_integer(min: i128, max: i128, wide: bool, dir: Dir) -> Value {
    let pattern = if min < 0 { "^-?[0-9]+$" } else { "^[0-9]+$" };
    match dir {
        Dir::Request => json!({ "anyOf": [
            integer(min, max),
            { "type": "string", "pattern": pattern },
        ]}),
        Dir::Response if wide => json!({
            "type": "string",
            "pattern": pattern,
            "description": "A 64-bit integer as a decimal string.",
        }),
        Dir::Response => integer(min, max),
    }
}

fn integer(min: i128, max: i128) -> Value {
    let bound = |n: i128| -> Value {
        i64::try_from(n)
            .map(Value::from)
            .or_else(|_| u64::try_from(n).map(Value::from))
            .unwrap_or(Value::Null)
    };
    json!({ "type": "integer", "minimum": bound(min), "maximum": bound(max) })
}

fn bytes_schema(dir: Dir) -> Value {
    let pattern = match dir {
        // Standard or URL-safe, padding optional.
        Dir::Request => "^[A-Za-z0-9+/_-]*={0,2}$",
        Dir::Response => "^[A-Za-z0-9+/]*={0,2}$",
    };
    json!({ "type": "string", "contentEncoding": "base64", "pattern": pattern })
}

fn map_key_pattern(kind: &Kind) -> Option<&'static str> {
    match kind {
        Kind::Bool => Some("^(true|false)$"),
        Kind::Int32
        | Kind::Sint32
        | Kind::Sfixed32
        | Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64 => Some("^-?[0-9]+$"),
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => Some("^[0-9]+$"),
        _ => None,
    }
}

/// `schema` or `null` (which leaves a request field unset).
fn nullable(schema: Value) -> Value {
    let Value::Object(mut object) = schema else {
        return schema;
    };
    // `{}` accepts null already.
    if object.is_empty() {
        return Value::Object(object);
    }
    if !object.contains_key("enum") {
        match object.get_mut("type") {
            Some(Value::String(t)) => {
                if t != "null" {
                    let t = std::mem::take(t);
                    object.insert("type".to_owned(), json!([t, "null"]));
                }
                return Value::Object(object);
            }
            Some(Value::Array(types)) => {
                if !types.iter().any(|t| t == "null") {
                    types.push(json!("null"));
                }
                return Value::Object(object);
            }
            _ => {}
        }
    }
    if object.len() == 1
        && let Some(Value::Array(any)) = object.get_mut("anyOf")
    {
        any.push(json!({ "type": "null" }));
        return Value::Object(object);
    }
    json!({ "anyOf": [Value::Object(object), { "type": "null" }] })
}

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem document.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {
                "type": "string",
                "description": "A URI naming the problem type (https://flashmesh.dev/problems/...), or `about:blank`.",
            },
            "title": { "type": "string", "description": "The HTTP reason phrase." },
            "status": { "type": "integer", "minimum": 100, "maximum": 599 },
            "detail": { "type": "string" },
            "code": {
                "type": "string",
                "description": "Stable UPPER_SNAKE code to branch on, e.g. SOLD_OUT, TOKEN_EXPIRED, RATE_LIMITED.",
            },
            "errors": {
                "type": "array",
                "description": "Each offending request field.",
                "items": {
                    "type": "object",
                    "required": ["field", "description"],
                    "properties": {
                        "field": { "type": "string", "description": "A field path such as `quantity` or `items[0].quantity`, or `body` / `query`." },
                        "description": { "type": "string" },
                    },
                },
            },
            "metadata": {
                "type": "object",
                "additionalProperties": { "type": "string" },
            },
        },
    })
}

fn problem_response(name: &str, description: &str) -> Value {
    let mut response = json!({
        "description": description,
        "content": {
            crate::problem::PROBLEM_JSON: {
                "schema": { "$ref": format!("{SCHEMA_PREFIX}Problem") },
            },
        },
    });
    let headers = match name {
        "Unauthorized" => json!({
            "WWW-Authenticate": {
                "description": "The bearer challenge.",
                "schema": { "type": "string" },
            },
        }),
        "TooManyRequests" | "Unavailable" => json!({
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": { "type": "string", "pattern": "^[0-9]+$" },
            },
        }),
        _ => return response,
    };
    response["headers"] = headers;
    response
}

/// The comments attached to the element at `path` in `file`, if the
/// descriptors carry source info: leading then trailing, one space of
/// indentation removed.
fn comments(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let parts: Vec<String> = [location.leading_comments(), location.trailing_comments()]
        .iter()
        .map(|c| {
            c.lines()
                .map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end())
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned()
        })
        .filter(|c| !c.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// The first sentence of a comment's first paragraph, on one line.
fn first_sentence(doc: &str) -> String {
    let paragraph = doc
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match paragraph.find(". ") {
        Some(end) => paragraph[..=end].to_owned(),
        None => paragraph,
    }
}

/// A self-contained HTML page listing the operations of `document` (method,
/// path, summary, auth), rendered server-side: no scripts, no external
/// fetches.
pub fn docs_page(document: &Value) -> String {
    let title = document
        .pointer("/info/title")
        .and_then(Value::as_str)
        .unwrap_or("API");
    let version = document
        .pointer("/info/version")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let global_security = document
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty());

    let mut rows = String::new();
    let mut count = 0usize;
    if let Some(paths) = document.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            for method in [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ] {
                let Some(operation) = item.get(method) else {
                    continue;
                };
                count += 1;
                let summary = operation
                    .get("summary")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let tag = operation
                    .pointer("/tags/0")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let id = operation
                    .get("operationId")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let secured = match operation.get("security").and_then(Value::as_array) {
                    Some(requirements) => !requirements.is_empty(),
                    None => global_security,
                };
                let auth = if secured { "bearer token" } else { "public" };
                let streaming = operation
                    .pointer("/responses/200/content")
                    .and_then(Value::as_object)
                    .is_some_and(|c| c.contains_key("text/event-stream"));
                rows.push_str(&format!(
                    "<tr><td class=\"m {cls}\">{method}</td><td><code>{path}</code>{stream}</td>\
                     <td>{summary}</td><td>{auth}</td><td>{tag}</td><td><code>{id}</code></td></tr>\n",
                    cls = escape(method),
                    method = escape(&method.to_ascii_uppercase()),
                    path = escape(path),
                    stream = if streaming { " <small>(SSE / NDJSON)</small>" } else { "" },
                    summary = escape(summary),
                    auth = auth,
                    tag = escape(tag),
                    id = escape(id),
                ));
            }
        }
    }

    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>\n\
         body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}\n\
         table{{border-collapse:collapse;width:100%}}\n\
         th,td{{border-bottom:1px solid #ddd;padding:.4rem .6rem;text-align:left;vertical-align:top}}\n\
         th{{background:#f4f4f4}}\n\
         td.m{{font-weight:bold;font-family:monospace}}\n\
         .get{{color:#0a6}}.post{{color:#06c}}.patch,.put{{color:#a60}}.delete{{color:#c00}}\n\
         </style>\n</head>\n<body>\n<h1>{title} <small>{version}</small></h1>\n\
         <p>{count} operations. The machine-readable description is \
         <a href=\"{doc_path}\"><code>{doc_path}</code></a> (OpenAPI 3.1). \
         Errors are <code>application/problem+json</code>; \
         authenticated routes take <code>Authorization: Bearer &lt;access token&gt;</code>.</p>\n\
         <table>\n<thead><tr><th>Method</th><th>Path</th><th>Summary</th><th>Auth</th>\
         <th>Service</th><th>Operation</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>\n\
         </body>\n</html>\n",
        title = escape(title),
        version = escape(version),
        count = count,
        doc_path = DOCUMENT_PATH,
        rows = rows,
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let pool = prost_reflect::DescriptorPool::decode(flashmesh_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors");
        RouteTable::from_descriptors(&pool, &[]).expect("routes")
    }

    fn doc() -> Value {
        let public: HashSet<String> = [
            "flashmesh.auth.v1.AuthService/Login",
            "flashmesh.auth.v1.AuthService/SignUp",
            "flashmesh.catalog.v1.CatalogService/GetDeal",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        document(&table(), &public, Some("http://localhost:8080"))
    }

    fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                out.push((path.clone(), method.clone(), operation));
            }
        }
        out
    }

    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(object) => {
                for (key, value) in object {
                    if key == "$ref" {
                        out.push(value.as_str().expect("$ref is a string"));
                    } else {
                        refs(value, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn document_basics() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["servers"][0]["url"], "http://localhost:8080");
        assert!(doc["components"]["schemas"]["Problem"].is_object());
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );

        let orders = &doc["paths"]["/v1/orders"];
        assert_eq!(
            orders["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/flashmesh.order.v1.PlaceOrderRequest"
        );
        let names: Vec<&str> = orders["get"]["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .map(|p| {
                assert_eq!(p["in"], "query");
                p["name"].as_str().expect("name")
            })
            .collect();
        assert_eq!(names, ["states", "page_size", "page_token"]);
        assert_eq!(orders["get"]["parameters"][0]["schema"]["type"], "array");
        assert!(orders["get"].get("requestBody").is_none());

        let cancel = &doc["paths"]["/v1/orders/{id}:cancel"]["post"];
        assert_eq!(cancel["parameters"][0]["name"], "id");
        assert_eq!(cancel["parameters"][0]["in"], "path");
        assert_eq!(cancel["parameters"][0]["required"], true);
        // The path-bound id is not part of the body.
        let body = &cancel["requestBody"]["content"]["application/json"]["schema"];
        assert!(
            body["properties"]
                .as_object()
                .expect("properties")
                .is_empty()
        );
        assert_eq!(body["additionalProperties"], false);

        let events = &doc["paths"]["/v1/deals/{id}/events"]["get"]["responses"]["200"]["content"];
        assert!(events["text/event-stream"].is_object());
        assert!(events["application/x-ndjson"].is_object());

        assert_eq!(
            doc["paths"]["/v1/auth/login"]["post"]["security"],
            json!([])
        );
        assert_eq!(
            doc["paths"]["/v1/orders"]["post"]["security"],
            json!([{ BEARER: [] }])
        );
        assert_eq!(
            doc["paths"]["/v1/orders"]["post"]["operationId"],
            "flashmesh_order_v1_OrderService_PlaceOrder"
        );
        assert_eq!(
            doc["paths"]["/v1/orders"]["post"]["tags"],
            json!(["OrderService"])
        );
    }

    #[test]
    fn comments_become_summaries() {
        let doc = doc();
        assert_eq!(
            doc["paths"]["/v1/orders/{id}"]["get"]["summary"],
            "One of the caller's orders."
        );
        assert!(
            doc["components"]["schemas"]["flashmesh.order.v1.PlaceOrderRequest"]["properties"]
                ["idempotency_key"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("idempotency") || d.contains("Required"))
        );
    }

    #[test]
    fn schemas_follow_the_gateway_json() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        let order = &schemas["flashmesh.order.v1.Order"];
        assert_eq!(order["properties"]["total_cents"]["type"], "string");
        assert_eq!(order["properties"]["created_at"]["format"], "date-time");
        assert_eq!(
            order["properties"]["state"]["$ref"],
            "#/components/schemas/flashmesh.order.v1.OrderState"
        );
        assert_eq!(order["properties"]["items"]["type"], "array");
        let required: Vec<&str> = order["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(required.contains(&"total_cents") && required.contains(&"items"));
        assert!(!required.contains(&"created_at"));
        assert!(order.get("additionalProperties").is_none());

        let product = &schemas["flashmesh.catalog.v1.Product"];
        let required = product["required"].as_array().expect("required");
        assert!(
            !required.contains(&json!("image_url")),
            "optional fields may be absent"
        );

        let place = &schemas["flashmesh.order.v1.PlaceOrderRequest"];
        assert_eq!(place["additionalProperties"], false);
        assert!(place.get("required").is_none());
        let quantity = &place["properties"]["quantity"]["anyOf"];
        assert!(
            quantity
                .as_array()
                .expect("anyOf")
                .contains(&json!({ "type": "null" }))
        );

        let enum_schema = &schemas["flashmesh.order.v1.OrderState"];
        assert_eq!(enum_schema["type"], "string");
        assert!(
            enum_schema["enum"]
                .as_array()
                .expect("enum")
                .contains(&json!("ORDER_STATE_CONFIRMED"))
        );

        let update = &doc["paths"]["/v1/products/{id}"]["patch"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert!(update["properties"].get("id").is_none());
        assert_eq!(
            update["properties"]["update_mask"]["type"],
            json!(["string", "null"])
        );
    }

    #[test]
    fn every_ref_resolves() {
        let doc = doc();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for reference in all {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref {reference}"));
            assert!(
                pointer.starts_with("/components/"),
                "{reference} is not a components entry"
            );
            assert!(
                doc.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }
    }

    #[test]
    fn document_is_structurally_valid() {
        let doc = doc();
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("schemes");
        let tags: Vec<&str> = doc["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        let mut ids = HashSet::new();
        let ops = operations(&doc);
        assert!(ops.len() >= 15, "{} operations", ops.len());
        for (path, method, operation) in &ops {
            assert!(path.starts_with('/'), "{path}");
            assert!(
                [
                    "get", "put", "post", "delete", "patch", "options", "head", "trace"
                ]
                .contains(&method.as_str()),
                "{method}"
            );
            let id = operation["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            let responses = operation["responses"].as_object().expect("responses");
            assert!(!responses.is_empty());
            for (status, response) in responses {
                assert!(
                    status == "default" || (status.len() == 3 && status.parse::<u16>().is_ok()),
                    "{status}"
                );
                assert!(
                    response.get("$ref").is_some() || response["description"].is_string(),
                    "{path} {method} {status} lacks a description"
                );
            }
            for requirement in operation["security"].as_array().expect("security") {
                for name in requirement.as_object().expect("requirement").keys() {
                    assert!(schemes.contains_key(name), "unknown scheme {name}");
                }
            }
            for tag in operation["tags"].as_array().expect("tags") {
                assert!(tags.contains(&tag.as_str().expect("tag")));
            }
            // Path parameters and template variables agree.
            let vars: BTreeSet<String> = template_vars(path)
                .iter()
                .zip(path.split('{').skip(1))
                .map(|(_, rest)| rest.split('}').next().unwrap_or_default().to_owned())
                .collect();
            let mut declared = BTreeSet::new();
            let mut seen = HashSet::new();
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().expect("name");
                let location = parameter["in"].as_str().expect("in");
                assert!(["path", "query", "header", "cookie"].contains(&location));
                assert!(seen.insert((name, location)), "duplicate parameter {name}");
                assert!(parameter["schema"].is_object());
                if location == "path" {
                    assert_eq!(parameter["required"], true);
                    declared.insert(name.to_owned());
                }
            }
            assert_eq!(vars, declared, "{method} {path}");
        }
        // Links name existing operations.
        for (_, _, operation) in &ops {
            for link in operation["responses"]["200"]["links"]
                .as_object()
                .into_iter()
                .flat_map(|l| l.values())
            {
                let target = link["operationId"].as_str().expect("operationId");
                assert!(ids.contains(target), "link to unknown {target}");
            }
        }
    }

    #[test]
    fn creations_link_to_their_getters() {
        let doc = doc();
        let place = &doc["paths"]["/v1/orders"]["post"]["responses"]["200"]["links"];
        assert_eq!(
            place["GetOrder"]["operationId"],
            "flashmesh_order_v1_OrderService_GetOrder"
        );
        assert_eq!(
            place["GetOrder"]["parameters"]["id"],
            "$response.body#/order/id"
        );
        let deal = &doc["paths"]["/v1/deals"]["post"]["responses"]["200"]["links"];
        assert_eq!(
            deal["GetDeal"]["parameters"]["id"],
            "$response.body#/deal/id"
        );
        let product = &doc["paths"]["/v1/products"]["post"]["responses"]["200"]["links"];
        assert!(product["GetProduct"].is_object());
        // Nothing links to itself.
        assert!(
            doc["paths"]["/v1/orders/{id}"]["get"]["responses"]["200"]
                .get("links")
                .is_none()
        );
    }

    #[test]
    fn docs_page_lists_operations() {
        let doc = doc();
        let page = docs_page(&doc);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("<code>/v1/orders/{id}:cancel</code>"));
        assert!(page.contains("One of the caller&#39;s orders."));
        assert!(page.contains(">public<"));
        assert!(page.contains(">bearer token<"));
        assert!(!page.contains("<script"));
        assert_eq!(page.matches("<tr><td").count(), operations(&doc).len());
    }

    /// `FLASHMESH_OPENAPI_OUT=path cargo test -p flashmesh-gateway openapi`
    /// writes the document, e.g. for an external validator.
    #[test]
    fn write_document_when_asked() {
        if let Ok(path) = std::env::var("FLASHMESH_OPENAPI_OUT") {
            let text = serde_json::to_string_pretty(&doc()).expect("json");
            std::fs::write(path, text).expect("write");
        }
    }
}
