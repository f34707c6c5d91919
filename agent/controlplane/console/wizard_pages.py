"""The New Connector wizard's pages: one POST form per step, the connection test, editing.

``/console/connectors/new`` walks Overview -> Credentials -> Connectivity mode; "Save and
Continue" applies the connector with the same core call as ``PUT /api/v1/connectors`` and starts
a test with the same call as ``POST .../test``, then redirects (so a reload never applies twice)
to the Connection test step, which the browser polls (htmx each second, or a meta refresh without
JavaScript) until the test ends. ``/console/connectors/{id}/edit`` is the same wizard, prefilled
from the stored connector, its identifier fixed.

Every step posts the whole form (the visible fields and the others hidden, see
:mod:`.wizard`), so each page is rendered from the request alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from aiohttp import web

from agent.aws.connector import ConnectorInvalid, derive_identifier
from agent.controlplane.console import wizard
from agent.controlplane.console.security import ConsoleRefusal, see_other
from agent.controlplane.console.session import Session
from agent.controlplane.console.wizard import FORM_STEPS, WizardCheck, WizardForm, WizardStep
from agent.controlplane.core import CONNECTED, ApiFailure, describe_tags, normalise_tags
from agent.controlplane.store import TaskRow, eligible
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, TestRequest
from agent.protocol.results import failure_result

if TYPE_CHECKING:
    from agent.controlplane.console.web import Console

__all__ = ["add_wizard_pages"]

NEW = "/console/connectors/new"
LIST = "/console/connectors"
#: Seconds between the no-JavaScript reloads of a running test (htmx polls each second).
REFRESH_SECONDS = 2

Action = Literal["next", "back", "yaml", "refresh", "save"]
_ACTIONS: frozenset[str] = frozenset({"next", "back", "yaml", "refresh", "save"})


def add_wizard_pages(console: Console, app: web.Application) -> None:
    """Mount the wizard; before any ``/console/connectors/{identifier}`` route, so ``new`` is the wizard."""
    pages = _Pages(console)
    r, g = app.router, console.guard
    r.add_get(NEW, g(pages.new), name="console_wizard_new")
    r.add_post(NEW, g(pages.new_step, post=True), name="console_wizard_new_step")
    r.add_get(NEW + "/identifier", g(pages.identifier), name="console_wizard_identifier")
    r.add_get(NEW + "/delegates", g(pages.delegates), name="console_wizard_delegates")
    r.add_get(NEW + "/test/{task_id}", g(pages.test), name="console_wizard_new_test")
    r.add_get(NEW + "/test/{task_id}/status", g(pages.test_status), name="console_wizard_new_test_status")
    r.add_get(LIST + "/{identifier}/edit", g(pages.edit), name="console_wizard_edit")
    r.add_post(LIST + "/{identifier}/edit", g(pages.edit_step, post=True), name="console_wizard_edit_step")
    r.add_get(LIST + "/{identifier}/edit/test/{task_id}", g(pages.test), name="console_wizard_edit_test")
    r.add_get(
        LIST + "/{identifier}/edit/test/{task_id}/status", g(pages.test_status), name="console_wizard_edit_test_status"
    )


@dataclass
class _Flow:
    """Which wizard a request is in: a new connector, or the edit of ``identifier`` (stored as ``base``)."""

    identifier: str | None = None
    base: dict[str, Any] | None = None

    @property
    def editing(self) -> bool:
        return self.identifier is not None

    @property
    def url(self) -> str:
        return NEW if self.identifier is None else f"{LIST}/{quote(self.identifier)}/edit"


@dataclass
class _Page:
    """What a form step's page shows."""

    step: WizardStep
    form: WizardForm
    errors: dict[str, list[str]] = field(default_factory=dict)
    yaml: str | None = None
    #: Said above the form (an apply refused for a reason no field explains).
    notices: list[str] = field(default_factory=list)


class _Pages:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.cp = console.cp

    # --- the form steps ------------------------------------------------------------------------

    async def new(self, request: web.Request, session: Session) -> web.StreamResponse:
        return await self._render(request, session, _Flow(), _Page("overview", WizardForm()))

    async def edit(self, request: web.Request, session: Session) -> web.StreamResponse:
        flow = await self._edit_flow(request)
        assert flow.base is not None
        try:
            form = WizardForm.from_document(flow.base)
        except ConnectorInvalid as exc:
            raise ConsoleRefusal(
                409,
                "This connector cannot be edited here",
                f"The stored connector no longer passes the checks ({exc}); apply a corrected document "
                "with delegate-agent connector apply.",
            ) from None
        return await self._render(request, session, flow, _Page(_form_step(request.query.get("step")), form))

    async def new_step(self, request: web.Request, session: Session) -> web.StreamResponse:
        return await self._step(request, session, _Flow())

    async def edit_step(self, request: web.Request, session: Session) -> web.StreamResponse:
        return await self._step(request, session, await self._edit_flow(request))

    async def _edit_flow(self, request: web.Request) -> _Flow:
        row = await self.cp.get_connector(request.match_info["identifier"])  # 404 page when unknown
        return _Flow(identifier=row.identifier, base=row.body)

    async def _step(self, request: web.Request, session: Session, flow: _Flow) -> web.StreamResponse:
        data = await request.post()
        form = WizardForm.from_form(data)
        if flow.identifier is not None:
            form = form.with_values(identifier=flow.identifier)  # fixed: an edit never renames
        step = _form_step(data.get("step"))
        action = str(data.get("action", "next"))
        if action not in _ACTIONS:
            action = "next"
        here = wizard.check(form, step, flow.base)
        form = here.form  # refused secret-looking values are gone from here on
        index = FORM_STEPS.index(step)
        if action == "back":
            return await self._render(request, session, flow, _Page(FORM_STEPS[max(index - 1, 0)], form))
        if action == "yaml":
            return await self._render(request, session, flow, _Page(step, form, yaml=wizard.to_yaml(here.document)))
        if action == "refresh":
            return await self._render(request, session, flow, _Page(step, form))
        errors = await self._errors(here, flow)
        if errors:
            first = min((wizard.step_of(name) for name in errors), key=FORM_STEPS.index)
            return await self._render(request, session, flow, _Page(first, form, errors))
        if step == "overview":
            form = form.with_values(identifier=form.effective_identifier)
        if action == "save" and step == "connectivity":
            return await self._save(request, session, flow, form)
        return await self._render(request, session, flow, _Page(FORM_STEPS[min(index + 1, 2)], form))

    async def _errors(self, result: WizardCheck, flow: _Flow) -> dict[str, list[str]]:
        """The check's errors, and, for a new connector, an identifier already taken (the API's apply
        would replace that connector: the wizard creates, it does not overwrite)."""
        errors = {k: list(v) for k, v in result.errors.items()}
        identifier = result.form.effective_identifier
        taken = not flow.editing and identifier and "identifier" not in errors
        if taken and await self.cp.store.get_connector(identifier) is not None:
            errors["identifier"] = [
                f"a connector with identifier {identifier!r} already exists: choose another identifier, "
                "or edit that connector"
            ]
        return errors

    async def _save(self, request: web.Request, session: Session, flow: _Flow, form: WizardForm) -> web.StreamResponse:
        """Apply the connector as the API does, start its test, and go to the Connection test step."""
        document = form.to_document(flow.base)
        try:
            applied = await self.cp.apply_connector(document)
        except ApiFailure as exc:
            # The wizard checked with the same parser, so this is rare (a stored connector changed
            # meanwhile); the problems still go beside their fields.
            errors: dict[str, list[str]] = {}
            for p in exc.problems or []:
                errors.setdefault(wizard.field_for_problem(p.field), []).append(p.message)
            page = _Page("connectivity", form, errors, notices=[] if errors else [exc.message])
            return await self._render(request, session, flow, page, status=exc.status)
        task = await self.cp.test_connector(applied.identifier, TestRequest(wait_seconds=0))
        prefix = NEW if not flow.editing else f"{LIST}/{quote(applied.identifier)}/edit"
        return see_other(f"{prefix}/test/{quote(task.id)}")

    async def _render(
        self, request: web.Request, session: Session, flow: _Flow, page: _Page, *, status: int = 200
    ) -> web.Response:
        form = page.form
        context: dict[str, Any] = {
            "title": ("Edit connector" if flow.editing else "New connector") + " · " + dict(wizard.STEPS)[page.step],
            "nav": "connectors",
            "flow_url": flow.url,
            "editing": flow.editing,
            "step": page.step,
            "steps": wizard.STEPS,
            "form": form,
            "errors": page.errors,
            "labels": wizard.FIELD_LABELS,
            "notices": page.notices,
            "hidden": form.hidden(except_step=page.step),
            "yaml": page.yaml,
            "generated": form.effective_identifier,
            "credential_choices": wizard.credential_choices(),
            "region_groups": wizard.region_groups(),
            "modes": wizard.CONNECTIVITY_MODES,
            "matching": await self._matching(form.connectivity, form.selectors)
            if page.step == "connectivity"
            else None,
        }
        return self.console.html("wizard.html", session, status=status, **context)

    # --- the live parts of the form steps -------------------------------------------------------

    async def identifier(self, request: web.Request, session: Session) -> web.StreamResponse:
        """The identifier field, regenerated from the name unless the person wrote their own."""
        name = request.query.get("name", "")[:4096].strip()
        written = request.query.get("identifier", "")[:4096].strip()
        was = request.query.get("identifier_from", "")[:4096].strip()
        auto = not written or written == (derive_identifier(was) if was else "")
        value = (derive_identifier(name) if name else "") if auto else written
        return self.console.html(
            "wizard_identifier.html",
            session,
            form=WizardForm(name=name, identifier=value),
            errors={},
            editing=False,
            generated=derive_identifier(name) if name else "",
        )

    async def delegates(self, request: web.Request, session: Session) -> web.StreamResponse:
        matching = await self._matching(
            request.query.get("connectivity", "any"), request.query.get("selectors", "")[:4096]
        )
        return self.console.html("wizard_delegates.html", session, matching=matching)

    async def _matching(self, mode: str, selectors_text: str) -> _Matching:
        """The connected delegates that would pick up this connector's test: the queue's own rule."""
        if mode == "platform":
            return _Matching(mode="platform")
        selectors = normalise_tags(WizardForm(selectors=selectors_text).selector_list()) if mode == "tags" else ()
        connected = [d for d in await self.cp.store.delegates() if d.state in CONNECTED]
        names = sorted(d.name for d in connected if eligible(TASK_TYPE_AWS_VALIDATE, selectors, d))
        return _Matching(
            mode=mode,
            selectors=selectors,
            names=names,
            others=describe_tags(connected) if connected and not names else "",
            pickup_seconds=self.cp.settings.pickup_timeout_seconds,
        )

    # --- the Connection test step ---------------------------------------------------------------

    async def test(self, request: web.Request, session: Session) -> web.StreamResponse:
        view = await self._test_view(request)
        return self.console.html(
            "wizard_test.html",
            session,
            title="Connection test · " + view.name,
            nav="connectors",
            step="test",
            steps=wizard.STEPS,
            test=view,
            refresh=REFRESH_SECONDS,
        )

    async def test_status(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self.console.html("wizard_test_status.html", session, test=await self._test_view(request))

    async def _test_view(self, request: web.Request) -> ConnectionTestView:
        task = await self.cp.get_task(request.match_info["task_id"])  # 404 page when unknown
        identifier = request.match_info.get("identifier")
        if task.connector_id is None or (identifier is not None and task.connector_id != identifier):
            raise web.HTTPNotFound()
        row = await self.cp.store.get_connector(task.connector_id)
        edit_base = f"{LIST}/{quote(task.connector_id)}/edit"
        base = f"{edit_base}/test/{quote(task.id)}" if identifier is not None else f"{NEW}/test/{quote(task.id)}"
        return describe_test(
            task,
            name=row.name if row is not None else task.connector_id,
            page_url=base,
            edit_url=f"{edit_base}?step=credentials" if row is not None else None,
        )


def _form_step(value: object) -> WizardStep:
    """The form step a request names (Overview for anything else)."""
    for step in FORM_STEPS:
        if value == step:
            return step
    return "overview"


@dataclass(frozen=True)
class _Matching:
    """Who would test the connector, for the Connectivity step."""

    mode: str
    selectors: tuple[str, ...] = ()
    names: list[str] = field(default_factory=list)
    #: What the connected delegates have instead, when none matches.
    others: str = ""
    pickup_seconds: float = 0.0


@dataclass(frozen=True)
class ConnectionTestStep:
    label: str
    status: str  # SUCCESS, FAILURE, SKIPPED, RUNNING, WAITING
    detail: str = ""


@dataclass(frozen=True)
class ConnectionTestView:
    """The Connection test step: where the test runs, its steps, and what it found."""

    task_id: str
    connector_id: str
    name: str
    done: bool
    status: str | None
    executing_on: str | None
    steps: list[ConnectionTestStep]
    account: str | None = None
    arn: str | None = None
    error_summary: str | None = None
    failed_step: str | None = None
    category: str | None = None
    aws_error_code: str | None = None
    hint: str | None = None
    page_url: str = ""
    status_url: str = ""
    edit_url: str | None = None


def _label(step: str) -> str:
    return step.replace("_", " ").replace("-", " ").capitalize()


def describe_test(task: TaskRow, *, name: str, page_url: str, edit_url: str | None) -> ConnectionTestView:
    """What the test step shows of a task, while it waits, runs, and once it ended."""
    on_platform = task.delegate_name == "platform" and task.delegate_id is None
    executing_on = "the platform (this control plane)" if on_platform else task.delegate_name
    result = task.result if task.state == "done" else None
    if task.state == "done" and result is None:  # not written by this control plane; never polled forever
        result = failure_result(task.failure_reason or "unknown", "The test ended without a result.", step="unknown")
    if result is None:
        # While queued, say what it waits for; once taken, by whom (never "waiting" next to "done").
        if task.state == "queued":
            picked = "waiting for a delegate" + (
                f" with the tags [{', '.join(task.selectors)}]" if task.selectors else ""
            )
        else:
            picked = f"by {executing_on}" if executing_on else ""
        steps = [
            ConnectionTestStep("Queued", "SUCCESS"),
            ConnectionTestStep("Picked up", "SUCCESS" if task.state != "queued" else "RUNNING", picked),
            ConnectionTestStep("Validating", "RUNNING" if task.state == "running" else "WAITING"),
        ]
        return ConnectionTestView(
            task_id=task.id,
            connector_id=task.connector_id or "",
            name=name,
            done=False,
            status=None,
            executing_on=executing_on,
            steps=steps,
            page_url=page_url,
            status_url=page_url + "/status",
            edit_url=edit_url,
        )
    failure = result.failure if result.status != "SUCCESS" else None
    steps = [ConnectionTestStep(_label(s.name), s.status, f"{s.duration_ms} ms") for s in result.steps]
    if failure is not None and not any(s.status == "FAILURE" for s in result.steps):
        steps.append(ConnectionTestStep(_label(failure.step), "FAILURE"))
    return ConnectionTestView(
        task_id=task.id,
        connector_id=task.connector_id or "",
        name=name,
        done=True,
        status=result.status,
        executing_on=executing_on if on_platform else result.delegate_name or executing_on,
        steps=steps,
        account=result.identity.account if result.identity else None,
        arn=result.identity.arn if result.identity else None,
        error_summary=result.error_summary,
        failed_step=_label(failure.step) if failure else None,
        category=failure.category if failure else None,
        aws_error_code=failure.aws_error_code if failure else None,
        hint=failure.hint if failure else None,
        page_url=page_url,
        status_url=page_url + "/status",
        edit_url=edit_url,
    )
