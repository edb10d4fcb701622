// Log in once with a token: the server keeps it in an HttpOnly cookie from then on.

import { login } from "../api.js";
import { h, fill } from "../dom.js";

export function renderLogin(main, done) {
  const input = h("input", {
    type: "password", id: "token", name: "token", autocomplete: "current-password",
    placeholder: "shoal_…", required: true, spellcheck: "false",
  });
  const error = h("p", { class: "error", role: "alert" });
  const submit = h("button", { class: "btn primary", type: "submit" }, "Log in");
  const form = h("form", { class: "login card" },
    h("h1", {}, "Shoal"),
    h("p", { class: "muted" }, "Enter an API token: the coordinator wrote an admin one to admin.token in its data dir, and `shoal token create` makes more. The browser keeps it in an HttpOnly cookie; this page never stores it."),
    h("label", { for: "token" }, "Token"), input, error, submit);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    fill(error);
    try {
      await login(input.value.trim());
      input.value = "";
      await done();
    } catch (err) {
      fill(error, err.status === 401 || err.status === 403 ? "That token was refused." : err.message);
    } finally {
      submit.disabled = false;
    }
  });
  fill(main, h("div", { class: "center" }, form));
  input.focus();
}
