import streamlit as st

st.title("6_summary")
