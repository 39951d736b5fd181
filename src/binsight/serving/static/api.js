// The pages' one way to call the API: with the token the person gave (kept for this browser tab
// only, never in a cookie or the URL), asking for one when the server answers 401 or 403.
const binsight = (() => {
  const KEY = "binsight-token";
  let retry = null;
  function form() {
    let f = document.getElementById("token-form");
    if (f) return f;
    f = document.createElement("form");
    f.id = "token-form"; f.className = "token"; f.hidden = true;
    const label = document.createElement("label");
    label.textContent = "This server needs an API token: ";
    const input = document.createElement("input");
    input.id = "token-input"; input.type = "password"; input.autocomplete = "off"; input.required = true;
    const button = document.createElement("button");
    button.textContent = "Use token";
    const note = document.createElement("span");
    note.id = "token-note";
    label.append(input); f.append(label, button, note);
    f.addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      input.value = ""; f.hidden = true;
      if (retry) retry();
    });
    document.querySelector("header").after(f);
    return f;
  }
  async function call(url, options = {}, onToken = null) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(KEY);
    if (token) headers.set("authorization", "Bearer " + token);
    const response = await fetch(url, {...options, headers});
    if (response.status === 401 || response.status === 403) {
      const body = await response.clone().json().catch(() => ({}));
      const code = body.error && body.error.code;
      if (code === "unauthenticated" || code === "insufficient_scope") {
        const f = form();
        document.getElementById("token-note").textContent =
          code === "insufficient_scope" ? " (the token given lacks the scope this page needs)" : "";
        f.hidden = false;
        retry = onToken;
      }
    }
    return response;
  }
  return {call};
})();
