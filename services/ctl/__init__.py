"""The operator side: the `warlock` CLI (`cli`) and its admin actions on the API's database (`admin`)."""
