/* Postier — the little script of the pages. Every page works without it; with it:
   - "Tester l'envoi d'e-mails" and "Vérifier la connexion" run without leaving the page and
     show their steps one by one;
   - leaving a settings or profile form with unsaved changes asks first;
   - the queue, "My e-mails" and an e-mail's detail refresh themselves (JSON polling);
   - confirmations before deleting, copying a new token, focus on an error summary.
   Texts come from the page (data-* attributes), so they are translated with the page. */
(function () {
  "use strict";

  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      body: body,
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" }
    });
  }

  /* -- folded parts of a long form ------------------------------------------------------ */
  // Every folded part (details[data-fold]) around an element is opened.
  function openAround(element) {
    for (var d = element && element.closest("details"); d; d = d.parentElement.closest("details")) {
      d.open = true;
    }
  }

  // What the fields of a folded part hold, to tell after a save which parts it changed.
  function foldState(fold) {
    return Array.prototype.map.call(fold.querySelectorAll("input, select, textarea"), function (c) {
      return c.name + "=" + (c.type === "checkbox" || c.type === "radio" ? c.checked : c.value);
    }).join("&");
  }

  var FOLDS_KEY = "postier.open-folds";

  // A part is open after a save that changed it (remembered in this tab only, for the next
  // page), when the address names an element in it, and when a control such as
  // "Authentication: OAuth2" asks for it (data-open-when, data-open-values).
  function setupFolds(form) {
    var folds = Array.prototype.slice.call(document.querySelectorAll("details[data-fold]"));
    var loaded = folds.map(foldState);
    try {
      JSON.parse(window.sessionStorage.getItem(FOLDS_KEY) || "[]").forEach(function (id) {
        openAround(document.getElementById(id));
      });
      window.sessionStorage.removeItem(FOLDS_KEY);
    } catch (e) { /* no storage: the parts stay as the server drew them */ }
    function openTarget() {
      if (window.location.hash.length > 1) {
        openAround(document.getElementById(decodeURIComponent(window.location.hash.slice(1))));
      }
    }
    openTarget();
    window.addEventListener("hashchange", openTarget);
    document.querySelectorAll("details[data-open-when]").forEach(function (fold) {
      var control = document.getElementById(fold.getAttribute("data-open-when"));
      var values = (fold.getAttribute("data-open-values") || "").split(" ");
      if (!control) { return; }
      control.addEventListener("change", function () {
        if (values.indexOf(control.value) >= 0) { fold.open = true; }
      });
    });
    if (!form) { return; }
    form.addEventListener("submit", function () {
      var changed = folds.filter(function (fold, i) {
        return form.contains(fold) && foldState(fold) !== loaded[i];
      }).map(function (fold) { return fold.id; });
      try { window.sessionStorage.setItem(FOLDS_KEY, JSON.stringify(changed)); } catch (e) { /* none */ }
    });
  }

  /* -- field errors, as the server renders them ---------------------------------------- */
  function clearErrors(form) {
    form.querySelectorAll("[data-field]").forEach(function (box) {
      var name = box.getAttribute("data-field");
      var err = document.getElementById("e-" + name);
      var control = document.getElementById("f-" + name);
      box.classList.remove("invalid");
      if (err) { err.hidden = true; err.textContent = ""; }
      if (control) {
        control.removeAttribute("aria-invalid");
        var ids = (control.getAttribute("aria-describedby") || "").split(" ")
          .filter(function (id) { return id && id !== "e-" + name; });
        if (ids.length) { control.setAttribute("aria-describedby", ids.join(" ")); }
        else { control.removeAttribute("aria-describedby"); }
      }
    });
  }

  function showErrors(form, errors) {
    var first = null;
    Object.keys(errors).forEach(function (name) {
      var box = form.querySelector('[data-field="' + name + '"]');
      var err = document.getElementById("e-" + name);
      var control = document.getElementById("f-" + name);
      if (!box || !err || !control) { return; }
      openAround(box);
      box.classList.add("invalid");
      err.textContent = errors[name];
      err.hidden = false;
      control.setAttribute("aria-invalid", "true");
      var ids = (control.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
      if (ids.indexOf("e-" + name) < 0) { ids.push("e-" + name); }
      control.setAttribute("aria-describedby", ids.join(" "));
      if (!first) { first = control; }
    });
    return first;
  }

  /* -- Tester l'envoi d'e-mails -------------------------------------------------------- */
  function revealSteps(result, done) {
    var steps = Array.prototype.slice.call(result.querySelectorAll("[data-step]"));
    var outcome = result.querySelector("[data-outcome]");
    steps.forEach(function (li) { li.classList.add("hidden"); });
    if (outcome) { outcome.classList.add("hidden"); }
    var i = 0;
    (function next() {
      if (i < steps.length) {
        var li = steps[i++];
        li.classList.remove("hidden");
        // Paced on the step's real duration, within bounds that keep it readable.
        var ms = Math.min(600, Math.max(150, parseInt(li.getAttribute("data-ms"), 10) || 0));
        window.setTimeout(next, ms);
      } else {
        if (outcome) { outcome.classList.remove("hidden"); }
        done();
      }
    })();
  }

  // Every test button of the form ("Vérifier la connexion", "Tester l'envoi d'e-mails")
  // shares the status line and the result; one test at a time.
  function setupTest(button) {
    var form = button.form;
    var status = form.querySelector("[data-test-status]");
    var result = document.getElementById("test-result");
    var to = document.getElementById("f-test_to");
    var buttons = form.querySelectorAll("[data-test-button]");
    var timer = null;

    function busy(on) {
      buttons.forEach(function (b) { b.disabled = on; });
      if (on) { button.setAttribute("aria-busy", "true"); }
      else { button.removeAttribute("aria-busy"); }
    }

    function finish() {
      window.clearInterval(timer);
      busy(false);
    }

    function run(event) {
      if (event) { event.preventDefault(); }
      if (button.disabled) { return; }
      clearErrors(form);
      result.innerHTML = "";
      var started = Date.now();
      var body = new FormData(form);
      if (button.name) { body.append(button.name, button.value); }
      busy(true);
      status.textContent = button.getAttribute("data-running");
      timer = window.setInterval(function () {
        var s = Math.floor((Date.now() - started) / 1000);
        status.textContent = button.getAttribute("data-running") + " " + s + " s";
      }, 1000);
      post(button.getAttribute("formaction"), body)
        .then(function (response) { return response.json(); })
        .then(function (data) {
          window.clearInterval(timer);
          if (data.errors && Object.keys(data.errors).length) {
            var first = showErrors(form, data.errors);
            status.textContent = data.message || button.getAttribute("data-nothing");
            finish();
            if (first) { first.focus(); }
            return;
          }
          if (data.error) {
            status.textContent = data.error.message;
            finish();
            return;
          }
          status.textContent = "";
          result.innerHTML = data.html;
          revealSteps(result, function () {
            finish();
            var title = result.querySelector(".report-title");
            status.textContent = (title ? title.textContent : "") +
              (data.unsaved_message ? " " + data.unsaved_message : "");
            result.focus();
          });
        })
        .catch(function () {
          status.textContent = button.getAttribute("data-failed");
          finish();
        });
    }

    button.addEventListener("click", run);
    if (to && button.hasAttribute("data-test-default")) {
      to.addEventListener("keydown", function (event) {
        if (event.key === "Enter") { run(event); }
      });
    }
  }

  /* -- unsaved changes ------------------------------------------------------------------ */
  // A form marked data-warn-unsaved asks before the page is left while its fields differ
  // from what was loaded (data-dirty: what was loaded is not saved either), except when
  // the form itself is submitted (saved) or a form marked data-unsaved-ok is (deleting).
  // The test fields are not settings: they do not count.
  function setupUnsaved(form) {
    function snapshot() {
      var parts = [];
      new FormData(form).forEach(function (value, name) {
        if (name === "csrf" || name.indexOf("test_") === 0) { return; }
        parts.push(name + "=" + value);
      });
      return parts.join("&");
    }
    var loaded = snapshot();
    var dirty = form.hasAttribute("data-dirty");
    var leaving = false;
    document.addEventListener("submit", function (event) {
      var target = event.target;
      if (!event.defaultPrevented &&
          (target === form || (target.hasAttribute && target.hasAttribute("data-unsaved-ok")))) {
        leaving = true;
      }
    });
    window.addEventListener("beforeunload", function (event) {
      if (leaving || (!dirty && snapshot() === loaded)) { return; }
      event.preventDefault();
      event.returnValue = "";  // older browsers need it to ask
    });
  }

  /* -- live refresh --------------------------------------------------------------------- */
  function setupLive(box) {
    var url = box.getAttribute("data-live");
    var every = parseInt(box.getAttribute("data-live-every"), 10) || 5000;
    var toggle = document.querySelector("[data-live-toggle]");
    var updated = document.querySelector("[data-live-updated]");
    var busy = false;

    function tick() {
      if (busy || document.hidden || (toggle && !toggle.checked)) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) {
          if (response.status === 401) { window.location.reload(); }
          return response.ok ? response.json() : null;
        })
        .then(function (data) {
          if (!data) { return; }
          Object.keys(data.regions || {}).forEach(function (id) {
            var region = document.getElementById(id);
            // Never pull the content from under the reader's keyboard focus.
            if (region && !region.contains(document.activeElement)) {
              region.innerHTML = data.regions[id];
            }
          });
          if (updated && data.updated) { updated.textContent = data.updated; }
        })
        .catch(function () { /* offline for a moment: the next tick tries again */ })
        .then(function () { busy = false; });
    }

    window.setInterval(tick, every);
  }

  /* -- the settings page: fields shown when they apply, relay presets ------------------- */
  // A box marked data-show-when="f-CONTROL" data-show-values="a b" is shown only while the
  // control's value (a select's, or "on" for a ticked box) is one of them. Without script
  // every box stays shown. A box holding an error is never hidden.
  function setupShowWhen(box) {
    var control = document.getElementById(box.getAttribute("data-show-when"));
    if (!control) { return; }
    var values = (box.getAttribute("data-show-values") || "").split(" ");
    function update() {
      var value = control.type === "checkbox" ? (control.checked ? "on" : "") : control.value;
      box.hidden = values.indexOf(value) < 0 && !box.querySelector(".field.invalid");
    }
    control.addEventListener("change", update);
    update();
  }

  // A preset fills the relay's fields in the page; its "Fill in" button (which asks the
  // server to do it when there is no script) is then not needed.
  function setupPreset(select) {
    var section = select.getAttribute("data-preset");
    var presets = JSON.parse(select.getAttribute("data-presets") || "{}");
    var box = select.closest(".preset");
    var apply = box.querySelector("[data-preset-apply]");
    var status = box.querySelector("[data-preset-status]");
    if (apply) { apply.hidden = true; }
    select.addEventListener("change", function () {
      var relay = presets[select.value];
      if (!relay) { return; }
      Object.keys(relay).forEach(function (key) {
        var field = document.getElementById("f-" + section + "." + key);
        // An empty host (the academy's preset) leaves the typed one alone.
        if (!field || relay[key] === "") { return; }
        field.value = relay[key] === null ? "" : String(relay[key]);
        var details = field.closest("details");
        if (details && field.value) { details.open = true; }
        field.dispatchEvent(new Event("change", { bubbles: true }));
      });
      if (status) { status.textContent = status.getAttribute("data-filled"); }
    });
  }

  /* -- small helpers -------------------------------------------------------------------- */
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  document.addEventListener("click", function (event) {
    // A click anywhere on a line such as the profiles' creation line goes to its field.
    var line = event.target.closest && event.target.closest("[data-focus]");
    if (line && !event.target.closest("input, button, a, select, textarea")) {
      var field = document.getElementById(line.getAttribute("data-focus"));
      if (field) { field.focus(); }
    }
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) { return; }
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) { return; }
    function copied() { button.textContent = button.getAttribute("data-copied"); }
    if (navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(copied);
    } else {
      // A page served over plain HTTP has no clipboard API: select and copy.
      var range = document.createRange();
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      if (document.execCommand("copy")) { copied(); }
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-test-button]").forEach(setupTest);
    document.querySelectorAll("[data-live]").forEach(setupLive);
    document.querySelectorAll("[data-show-when]").forEach(setupShowWhen);
    document.querySelectorAll("[data-preset]").forEach(setupPreset);
    document.querySelectorAll("[data-warn-unsaved]").forEach(setupUnsaved);
    if (document.querySelector("details[data-fold]")) {
      setupFolds(document.querySelector("form[data-settings-form]"));
    }
    var summary = document.querySelector("[data-autofocus]");
    if (summary) { summary.focus(); }
  });
})();
