//! The `#[step]` attribute of `stepbox-sdk`. Use it through `stepbox_sdk::step`.

use proc_macro::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, parse_macro_input};

/// Turn a function into the step's `run` export.
///
/// The function takes the input (any `serde::Deserialize` type), optionally
/// preceded by `&stepbox_sdk::Context`, and returns
/// `Result<O, stepbox_sdk::StepError>` where `O` is any `serde::Serialize`
/// type:
///
/// ```ignore
/// #[stepbox_sdk::step]
/// fn run(ctx: &Context, input: Order) -> Result<Receipt, StepError> { ... }
/// ```
///
/// Input that does not decode into the input type fails the attempt as
/// `fatal`, naming the type.
#[proc_macro_attribute]
pub fn step(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new(attr.span(), "#[step] takes no arguments").to_compile_error().into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(&func) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(func: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &func.sig;
    if let Some(asyncness) = sig.asyncness {
        return Err(syn::Error::new(
            asyncness.span(),
            "a step function cannot be async; stepbox runs one attempt per call",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a step function cannot be generic: its input type must be known",
        ));
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return Err(syn::Error::new(receiver.span(), "a step is a free function, not a method"));
    }
    let name = &sig.ident;
    let call = match sig.inputs.len() {
        1 => quote! { |_ctx, input| #name(input) },
        2 => quote! { |ctx, input| #name(ctx, input) },
        _ => {
            return Err(syn::Error::new(
                sig.inputs.span(),
                "a step function takes `(input)` or `(ctx: &Context, input)`",
            ));
        }
    };
    let export = quote_spanned! { sig.ident.span() =>
        ::stepbox_sdk::__private::export!(__StepboxStep with_types_in ::stepbox_sdk::__private::bindings);
    };
    Ok(quote! {
        #func

        const _: () = {
            struct __StepboxStep;

            impl ::stepbox_sdk::__private::Guest for __StepboxStep {
                fn run(
                    ctx: ::stepbox_sdk::__private::StepContext,
                    input: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, ::stepbox_sdk::__private::WitStepError> {
                    ::stepbox_sdk::__private::run_step(ctx, input, #call)
                }
            }

            #export
        };
    })
}
