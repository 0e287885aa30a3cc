//! `template.yaml` as data: YAML (with CloudFormation's short-form tags) turned into JSON with
//! intrinsics in their long form, the resources in dependency order, and a resolver for `Ref`,
//! `Fn::GetAtt`, `Fn::Sub`, `Fn::Join`, `Fn::Select`, `Fn::Split` and `Fn::If`, with the
//! `Conditions` (`Fn::Equals`, `Fn::Not`, `Fn::And`, `Fn::Or`, `Condition`) they and the
//! resources' `Condition` refer to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("template: {0}")]
    Invalid(String),
    #[error("resources depend on each other in a cycle: {0}")]
    Cycle(String),
    #[error("cannot resolve {0}")]
    Unresolved(String),
    #[error("{function} is not supported by the local provisioner (in {context})")]
    UnsupportedIntrinsic { function: String, context: String },
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub logical_id: String,
    pub kind: String,
    pub properties: Value,
    pub depends_on: BTreeSet<String>,
    /// The name of the template condition that decides whether it is created at all.
    pub condition: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub path: PathBuf,
    pub parameters: BTreeMap<String, Value>,
    /// SAM `Globals` (long-form intrinsics, unresolved).
    pub globals: Value,
    /// `Conditions`, by name (long-form intrinsics, evaluated by the [`Resolver`]).
    pub conditions: BTreeMap<String, Value>,
    pub resources: BTreeMap<String, Resource>,
    pub outputs: BTreeMap<String, Value>,
}

/// Converts YAML to JSON, turning `!Ref x` into `{"Ref": "x"}`, `!GetAtt A.B` into
/// `{"Fn::GetAtt": ["A", "B"]}` and `!Fn x` into `{"Fn::Fn": x}`.
pub fn yaml_to_json(value: serde_yaml_ng::Value) -> Result<Value, TemplateError> {
    use serde_yaml_ng::Value as Y;
    Ok(match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).map_err(|e| TemplateError::Invalid(e.to_string()))?,
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(TemplateError::Invalid(format!("unsupported mapping key {other:?}"))),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            let inner = yaml_to_json(tagged.value)?;
            match name {
                "Ref" | "Condition" => json!({ name: inner }),
                "GetAtt" => match inner {
                    Value::String(s) => {
                        let (resource, attribute) = s
                            .split_once('.')
                            .ok_or_else(|| TemplateError::Invalid(format!("!GetAtt {s} needs Resource.Attribute")))?;
                        json!({ "Fn::GetAtt": [resource, attribute] })
                    }
                    other => json!({ "Fn::GetAtt": other }),
                },
                _ => json!({ format!("Fn::{name}"): inner }),
            }
        }
    })
}

impl Template {
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read { path: path.into(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, TemplateError> {
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .map_err(|e| TemplateError::Yaml { path: path.into(), message: e.to_string() })?;
        let root = yaml_to_json(yaml)?;
        let section = |name: &str| root.get(name).and_then(Value::as_object).cloned().unwrap_or_default();

        let parameters = section("Parameters").into_iter().collect();
        let conditions: BTreeMap<String, Value> = section("Conditions").into_iter().collect();
        let outputs = section("Outputs").into_iter().collect();
        let mut resources = BTreeMap::new();
        for (logical_id, body) in section("Resources") {
            let kind = body
                .get("Type")
                .and_then(Value::as_str)
                .ok_or_else(|| TemplateError::Invalid(format!("resource {logical_id} has no Type")))?
                .to_owned();
            let condition = match body.get("Condition") {
                None => None,
                Some(Value::String(name)) if conditions.contains_key(name) => Some(name.clone()),
                Some(other) => {
                    return Err(TemplateError::Invalid(format!(
                        "{logical_id}: Condition {other} is not in Conditions"
                    )));
                }
            };
            let depends_on = match body.get("DependsOn") {
                None => BTreeSet::new(),
                Some(Value::String(s)) => BTreeSet::from([s.clone()]),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                Some(other) => return Err(TemplateError::Invalid(format!("{logical_id}: DependsOn {other}"))),
            };
            let properties = body.get("Properties").cloned().unwrap_or_else(|| json!({}));
            resources.insert(logical_id.clone(), Resource { logical_id, kind, properties, depends_on, condition });
        }
        Ok(Self { path: path.into(), parameters, globals: section("Globals").into(), conditions, resources, outputs })
    }

    /// The folder relative paths in the template (e.g. `DefinitionUri`) are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or_else(|| Path::new("."))
    }

    /// Resources ordered so that each comes after everything it references.
    pub fn creation_order(&self) -> Result<Vec<&Resource>, TemplateError> {
        let mut deps: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (id, resource) in &self.resources {
            let mut refs = BTreeSet::new();
            collect_references(&resource.properties, &mut refs);
            refs.extend(resource.depends_on.iter().cloned());
            refs.retain(|r| self.resources.contains_key(r) && r != id);
            deps.insert(id, refs);
        }
        let mut order = Vec::with_capacity(deps.len());
        let mut done: BTreeSet<String> = BTreeSet::new();
        while done.len() < deps.len() {
            let ready: Vec<&str> = deps
                .iter()
                .filter(|(id, refs)| !done.contains(**id) && refs.iter().all(|r| done.contains(r)))
                .map(|(id, _)| *id)
                .collect();
            if ready.is_empty() {
                let stuck: Vec<&str> = deps.keys().filter(|id| !done.contains(**id)).copied().collect();
                return Err(TemplateError::Cycle(stuck.join(", ")));
            }
            for id in ready {
                done.insert(id.to_owned());
                order.push(&self.resources[id]);
            }
        }
        Ok(order)
    }
}

/// Logical ids (and parameter names) a value refers to through `Ref`, `Fn::GetAtt` or `Fn::Sub`.
pub fn collect_references(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("Ref") {
                out.insert(target.clone());
            }
            if let Some(Value::Array(parts)) = map.get("Fn::GetAtt")
                && let Some(Value::String(target)) = parts.first()
            {
                out.insert(target.clone());
            }
            if let Some(sub) = map.get("Fn::Sub") {
                let text = match sub {
                    Value::String(s) => Some(s.as_str()),
                    Value::Array(parts) => parts.first().and_then(Value::as_str),
                    _ => None,
                };
                for name in text.map(sub_variables).unwrap_or_default() {
                    out.insert(name.split('.').next().unwrap_or(&name).to_owned());
                }
            }
            map.values().for_each(|v| collect_references(v, out));
        }
        _ => {}
    }
}

/// The `${Name}` / `${Name.Attr}` variables of a `Fn::Sub` string (`${!Literal}` excluded).
fn sub_variables(text: &str) -> Vec<String> {
    let mut vars = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if !name.starts_with('!') {
            vars.push(name.to_owned());
        }
        rest = &after[end + 1..];
    }
    vars
}

/// What a provisioned (or locally stood-in) resource resolves to.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resolved {
    /// What `Ref` returns.
    pub reference: String,
    /// What `Fn::GetAtt` returns, by attribute name.
    pub attributes: BTreeMap<String, String>,
}

/// Evaluates intrinsics against parameters, pseudo parameters and the resources resolved so far.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub pseudo: HashMap<String, String>,
    pub parameters: HashMap<String, Value>,
    pub conditions: BTreeMap<String, Value>,
    pub resources: BTreeMap<String, Resolved>,
}

/// Conditions may refer to conditions; deeper than this is a cycle.
const MAX_CONDITION_DEPTH: usize = 32;

impl Resolver {
    pub fn new(
        template: &Template,
        stack_name: &str,
        region: &str,
        account_id: &str,
        overrides: &HashMap<String, String>,
    ) -> Result<Self, TemplateError> {
        let pseudo = HashMap::from([
            ("AWS::StackName".to_owned(), stack_name.to_owned()),
            ("AWS::Region".to_owned(), region.to_owned()),
            ("AWS::AccountId".to_owned(), account_id.to_owned()),
            ("AWS::Partition".to_owned(), "aws".to_owned()),
            ("AWS::URLSuffix".to_owned(), "amazonaws.com".to_owned()),
            (
                "AWS::StackId".to_owned(),
                format!("arn:aws:cloudformation:{region}:{account_id}:stack/{stack_name}/local"),
            ),
        ]);
        let mut parameters = HashMap::new();
        for (name, spec) in &template.parameters {
            let value = match overrides.get(name) {
                Some(v) => Value::String(v.clone()),
                None => spec.get("Default").cloned().ok_or_else(|| {
                    TemplateError::Unresolved(format!("parameter {name}: no Default and no override"))
                })?,
            };
            parameters.insert(name.clone(), value);
        }
        Ok(Self { pseudo, parameters, conditions: template.conditions.clone(), resources: BTreeMap::new() })
    }

    /// Whether the named condition of `Conditions` holds, as CloudFormation decides it at deploy
    /// time from the parameters.
    pub fn condition(&self, name: &str) -> Result<bool, TemplateError> {
        self.named_condition(name, 0)
    }

    fn named_condition(&self, name: &str, depth: usize) -> Result<bool, TemplateError> {
        if depth > MAX_CONDITION_DEPTH {
            return Err(TemplateError::Invalid(format!("condition {name} refers to itself")));
        }
        let body = self.conditions.get(name).ok_or_else(|| TemplateError::Unresolved(format!("Condition {name}")))?;
        self.evaluate(body, depth + 1)
    }

    fn evaluate(&self, value: &Value, depth: usize) -> Result<bool, TemplateError> {
        let invalid = || TemplateError::Invalid(format!("condition {value}"));
        let (function, arg) =
            value.as_object().filter(|m| m.len() == 1).and_then(|m| m.iter().next()).ok_or_else(invalid)?;
        let operands = || arg.as_array().map(Vec::as_slice).ok_or_else(invalid);
        match function.as_str() {
            "Condition" => self.named_condition(arg.as_str().ok_or_else(invalid)?, depth),
            "Fn::Equals" => match operands()? {
                // CloudFormation compares the values as strings: `!Equals [!Ref Count, 0]`.
                [a, b] => Ok(self.resolve_string(a)? == self.resolve_string(b)?),
                _ => Err(invalid()),
            },
            "Fn::Not" => match operands()? {
                [c] => Ok(!self.evaluate(c, depth)?),
                _ => Err(invalid()),
            },
            "Fn::And" | "Fn::Or" => {
                let items = operands()?;
                if items.len() < 2 {
                    return Err(invalid());
                }
                let mut results = items.iter().map(|c| self.evaluate(c, depth));
                if function == "Fn::And" {
                    results.try_fold(true, |all, r| Ok(all && r?))
                } else {
                    results.try_fold(false, |any, r| Ok(any || r?))
                }
            }
            _ => Err(invalid()),
        }
    }

    /// Resolves every intrinsic inside `value`.
    pub fn resolve(&self, value: &Value) -> Result<Value, TemplateError> {
        match value {
            Value::Array(items) => Ok(Value::Array(items.iter().map(|v| self.resolve(v)).collect::<Result<_, _>>()?)),
            Value::Object(map) if map.len() == 1 => {
                let (key, arg) = map.iter().next().expect("len is 1");
                match key.as_str() {
                    "Ref" => self.reference(arg),
                    "Fn::GetAtt" => self.get_att(arg),
                    "Fn::Sub" => self.sub(arg),
                    "Fn::Join" => self.join(arg),
                    "Fn::Select" => self.select(arg),
                    "Fn::Split" => self.split(arg),
                    "Fn::If" => self.if_(arg),
                    k if k.starts_with("Fn::") || k == "Condition" => {
                        Err(TemplateError::UnsupportedIntrinsic { function: k.to_owned(), context: value.to_string() })
                    }
                    _ => Ok(Value::Object(self.resolve_map(map)?)),
                }
            }
            Value::Object(map) => Ok(Value::Object(self.resolve_map(map)?)),
            other => Ok(other.clone()),
        }
    }

    pub fn resolve_string(&self, value: &Value) -> Result<String, TemplateError> {
        match self.resolve(value)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(TemplateError::Invalid(format!("expected a string, got {other}"))),
        }
    }

    fn resolve_map(&self, map: &Map<String, Value>) -> Result<Map<String, Value>, TemplateError> {
        map.iter().map(|(k, v)| Ok((k.clone(), self.resolve(v)?))).collect()
    }

    fn lookup(&self, name: &str) -> Result<Value, TemplateError> {
        if let Some(v) = self.pseudo.get(name) {
            return Ok(Value::String(v.clone()));
        }
        if let Some(v) = self.parameters.get(name) {
            return Ok(v.clone());
        }
        if let Some(r) = self.resources.get(name) {
            return Ok(Value::String(r.reference.clone()));
        }
        Err(TemplateError::Unresolved(format!("Ref {name}")))
    }

    fn attribute(&self, resource: &str, attribute: &str) -> Result<String, TemplateError> {
        self.resources
            .get(resource)
            .and_then(|r| r.attributes.get(attribute))
            .cloned()
            .ok_or_else(|| TemplateError::Unresolved(format!("Fn::GetAtt {resource}.{attribute}")))
    }

    fn reference(&self, arg: &Value) -> Result<Value, TemplateError> {
        let name = arg.as_str().ok_or_else(|| TemplateError::Invalid(format!("Ref {arg}")))?;
        self.lookup(name)
    }

    fn get_att(&self, arg: &Value) -> Result<Value, TemplateError> {
        let parts = self.resolve(arg)?;
        let (Some(resource), Some(attribute)) =
            (parts.get(0).and_then(Value::as_str), parts.get(1).and_then(Value::as_str))
        else {
            return Err(TemplateError::Invalid(format!("Fn::GetAtt {arg}")));
        };
        Ok(Value::String(self.attribute(resource, attribute)?))
    }

    fn sub(&self, arg: &Value) -> Result<Value, TemplateError> {
        let (text, vars) = match arg {
            Value::String(s) => (s.as_str(), Map::new()),
            Value::Array(parts) => (
                parts
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| TemplateError::Invalid(format!("Fn::Sub {arg}")))?,
                parts.get(1).and_then(Value::as_object).cloned().unwrap_or_default(),
            ),
            _ => return Err(TemplateError::Invalid(format!("Fn::Sub {arg}"))),
        };
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| TemplateError::Invalid(format!("unclosed ${{ in {text}")))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str("${");
                out.push_str(literal);
                out.push('}');
            } else if let Some(v) = vars.get(name) {
                out.push_str(&self.resolve_string(v)?);
            } else if let Some((resource, attribute)) = name.split_once('.').filter(|_| !name.starts_with("AWS::")) {
                out.push_str(&self.attribute(resource, attribute)?);
            } else {
                out.push_str(&self.resolve_string(&self.lookup(name)?)?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    }

    fn join(&self, arg: &Value) -> Result<Value, TemplateError> {
        let parts = self.resolve(arg)?;
        let (Some(sep), Some(items)) = (parts.get(0).and_then(Value::as_str), parts.get(1).and_then(Value::as_array))
        else {
            return Err(TemplateError::Invalid(format!("Fn::Join {arg}")));
        };
        let strings = items.iter().map(|v| self.resolve_string(v)).collect::<Result<Vec<_>, _>>()?;
        Ok(Value::String(strings.join(sep)))
    }

    fn select(&self, arg: &Value) -> Result<Value, TemplateError> {
        let parts = self.resolve(arg)?;
        let index = match parts.get(0) {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        let item = index.and_then(|i| parts.get(1).and_then(Value::as_array).and_then(|a| a.get(i as usize)));
        item.cloned().ok_or_else(|| TemplateError::Invalid(format!("Fn::Select {arg}")))
    }

    /// `Fn::If [condition, then, else]`; only the branch taken is resolved, as it may refer to a
    /// resource the condition left out.
    fn if_(&self, arg: &Value) -> Result<Value, TemplateError> {
        let Some([Value::String(condition), then, otherwise]) = arg.as_array().map(Vec::as_slice) else {
            return Err(TemplateError::Invalid(format!("Fn::If {arg}")));
        };
        self.resolve(if self.condition(condition)? { then } else { otherwise })
    }

    fn split(&self, arg: &Value) -> Result<Value, TemplateError> {
        let parts = self.resolve(arg)?;
        let (Some(sep), Some(text)) = (parts.get(0).and_then(Value::as_str), parts.get(1).and_then(Value::as_str))
        else {
            return Err(TemplateError::Invalid(format!("Fn::Split {arg}")));
        };
        Ok(Value::Array(text.split(sep).map(|s| Value::String(s.to_owned())).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
Parameters:
  Stage: { Type: String, Default: dev }
Globals:
  Function:
    Environment:
      Variables:
        QUEUE_URL: !Ref Work
Resources:
  Work:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !Sub "${AWS::StackName}-${Stage}-work"
      RedrivePolicy:
        deadLetterTargetArn: !GetAtt WorkDlq.Arn
        maxReceiveCount: 5
  WorkDlq:
    Type: AWS::SQS::Queue
  Later:
    Type: AWS::SNS::Topic
    DependsOn: Work
    Properties:
      Name: !Join ["-", [!Ref Stage, !Select [1, !Split [",", "a,b,c"]]]]
      Literal: !Sub "${!NotAVar}-${Work.Arn}"
"#;

    fn resolver(template: &Template) -> Resolver {
        Resolver::new(template, "stack", "eu-west-1", "000000000000", &HashMap::new()).expect("resolver")
    }

    #[test]
    fn short_form_tags_become_long_form_intrinsics() {
        let t = Template::parse(Path::new("t.yaml"), TEMPLATE).expect("parses");
        let work = &t.resources["Work"].properties;
        assert_eq!(work["RedrivePolicy"]["deadLetterTargetArn"], json!({"Fn::GetAtt": ["WorkDlq", "Arn"]}));
        assert_eq!(work["QueueName"], json!({"Fn::Sub": "${AWS::StackName}-${Stage}-work"}));
        assert_eq!(t.globals["Function"]["Environment"]["Variables"]["QUEUE_URL"], json!({"Ref": "Work"}));
    }

    #[test]
    fn resources_come_after_what_they_reference() {
        let t = Template::parse(Path::new("t.yaml"), TEMPLATE).expect("parses");
        let order: Vec<&str> = t.creation_order().unwrap().iter().map(|r| r.logical_id.as_str()).collect();
        assert_eq!(order, ["WorkDlq", "Work", "Later"]);
    }

    #[test]
    fn cycles_are_reported() {
        let t = Template::parse(
            Path::new("t.yaml"),
            "Resources:\n  A: {Type: X, Properties: {P: !Ref B}}\n  B: {Type: X, Properties: {P: !Ref A}}\n",
        )
        .unwrap();
        assert!(matches!(t.creation_order(), Err(TemplateError::Cycle(ids)) if ids == "A, B"));
    }

    #[test]
    fn intrinsics_resolve_against_parameters_pseudo_parameters_and_resources() {
        let t = Template::parse(Path::new("t.yaml"), TEMPLATE).expect("parses");
        let mut r = resolver(&t);
        assert_eq!(r.resolve(&t.resources["Work"].properties["QueueName"]).unwrap(), json!("stack-dev-work"));
        assert!(matches!(r.resolve(&json!({"Ref": "Work"})), Err(TemplateError::Unresolved(_))));

        r.resources.insert(
            "Work".into(),
            Resolved {
                reference: "http://q/work".into(),
                attributes: BTreeMap::from([("Arn".into(), "arn:q:work".into())]),
            },
        );
        let later = r.resolve(&t.resources["Later"].properties).unwrap();
        assert_eq!(later["Name"], json!("dev-b"));
        assert_eq!(later["Literal"], json!("${NotAVar}-arn:q:work"));
        assert_eq!(
            r.resolve(&t.globals).unwrap()["Function"]["Environment"]["Variables"]["QUEUE_URL"],
            json!("http://q/work")
        );
    }

    const CONDITIONAL: &str = r#"
Parameters:
  Endpoint: { Type: String, Default: "" }
  Count: { Type: Number, Default: 0 }
Conditions:
  HasEndpoint: !Not [!Equals [!Ref Endpoint, ""]]
  NoCount: !Equals [!Ref Count, 0]
  Both: !And [!Condition HasEndpoint, !Condition NoCount]
  Either: !Or [!Condition HasEndpoint, !Condition NoCount]
  Loop: !Not [!Condition Loop]
Resources:
  Topic:
    Type: AWS::SNS::Topic
  Subscription:
    Type: AWS::SNS::Subscription
    Condition: HasEndpoint
    Properties:
      Endpoint: !Ref Endpoint
      Label: !If [HasEndpoint, !Ref Endpoint, !GetAtt Missing.Arn]
"#;

    fn with(template: &Template, overrides: &[(&str, &str)]) -> Resolver {
        let overrides = overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Resolver::new(template, "stack", "eu-west-1", "000000000000", &overrides).expect("resolver")
    }

    #[test]
    fn a_resource_keeps_the_name_of_its_condition() {
        let t = Template::parse(Path::new("t.yaml"), CONDITIONAL).expect("parses");
        assert_eq!(t.resources["Subscription"].condition.as_deref(), Some("HasEndpoint"));
        assert_eq!(t.resources["Topic"].condition, None);
        assert_eq!(t.conditions["HasEndpoint"], json!({"Fn::Not": [{"Fn::Equals": [{"Ref": "Endpoint"}, ""]}]}));
    }

    #[test]
    fn conditions_are_decided_by_the_parameters() {
        let t = Template::parse(Path::new("t.yaml"), CONDITIONAL).expect("parses");
        let defaults = resolver(&t);
        assert!(!defaults.condition("HasEndpoint").unwrap());
        // A number parameter compares with a number in the template as CloudFormation does
        assert!(defaults.condition("NoCount").unwrap());
        assert!(!defaults.condition("Both").unwrap());
        assert!(defaults.condition("Either").unwrap());

        let set = with(&t, &[("Endpoint", "ops@example.com"), ("Count", "2")]);
        assert!(set.condition("HasEndpoint").unwrap());
        assert!(!set.condition("NoCount").unwrap());
        assert!(!set.condition("Both").unwrap());
        assert!(set.condition("Either").unwrap());
    }

    #[test]
    fn fn_if_resolves_only_the_branch_its_condition_takes() {
        let t = Template::parse(Path::new("t.yaml"), CONDITIONAL).expect("parses");
        let set = with(&t, &[("Endpoint", "ops@example.com")]);
        let props = set.resolve(&t.resources["Subscription"].properties).unwrap();
        assert_eq!(props["Label"], json!("ops@example.com"));
        // The other branch refers to a resource that does not exist: taking it fails by name
        let err = resolver(&t).resolve(&t.resources["Subscription"].properties).unwrap_err();
        assert!(matches!(err, TemplateError::Unresolved(ref what) if what.contains("Missing.Arn")), "{err}");
    }

    #[test]
    fn bad_conditions_are_errors_not_answers() {
        let t = Template::parse(Path::new("t.yaml"), CONDITIONAL).expect("parses");
        let r = resolver(&t);
        assert!(matches!(r.condition("Loop"), Err(TemplateError::Invalid(_))));
        assert!(matches!(r.condition("Nowhere"), Err(TemplateError::Unresolved(_))));
        let undeclared = "Resources:\n  A: {Type: X, Condition: Nowhere}\n";
        assert!(matches!(Template::parse(Path::new("t.yaml"), undeclared), Err(TemplateError::Invalid(_))));
    }

    #[test]
    fn unsupported_intrinsics_are_named() {
        let t = Template::parse(Path::new("t.yaml"), "Resources: {}\n").unwrap();
        let err = resolver(&t).resolve(&json!({"Fn::FindInMap": ["M", "k", "v"]})).unwrap_err();
        assert!(
            matches!(err, TemplateError::UnsupportedIntrinsic { ref function, .. } if function == "Fn::FindInMap"),
            "{err}"
        );
    }
}
